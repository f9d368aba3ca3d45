//! The worker's Prometheus metrics: tasks by outcome, bytes read and written, task and tensor
//! durations, and the memory pool.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use shardpress_engine::MemoryPool;

/// An `outcome` label: `completed`, `failed` (reported to the coordinator) or `dropped`
/// (lease lost or shutdown; nothing reported).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// How the task ended.
    pub outcome: String,
}

/// Every metric of a worker, and the registry that exports them.
#[derive(Debug)]
pub struct Metrics {
    /// Tasks ended, by outcome.
    pub tasks: Family<Outcome, Counter>,
    /// Tasks running now.
    pub running: Gauge,
    /// Input bytes of completed tasks.
    pub bytes_read: Counter,
    /// Output bytes uploaded by completed tasks.
    pub bytes_written: Counter,
    /// Seconds per task, from lease to report, of every outcome.
    pub task_seconds: Histogram,
    /// Seconds per tensor.
    pub tensor_seconds: Histogram,
    /// Bytes of the memory pool in buffers now.
    pub pool_in_use: Gauge,
    /// Bytes of the memory pool reserved by tasks now.
    pub pool_reserved: Gauge,
    /// The memory pool's budget (absent without a limit).
    pub pool_limit: Gauge,
}

impl Metrics {
    /// Metrics at zero and the registry holding them.
    pub fn new() -> (Self, Registry) {
        let m = Metrics {
            tasks: Family::default(),
            running: Gauge::default(),
            bytes_read: Counter::default(),
            bytes_written: Counter::default(),
            task_seconds: Histogram::new(shardpress_proto::metrics::task_seconds_buckets()),
            tensor_seconds: Histogram::new(shardpress_proto::metrics::tensor_seconds_buckets()),
            pool_in_use: Gauge::default(),
            pool_reserved: Gauge::default(),
            pool_limit: Gauge::default(),
        };
        for outcome in ["completed", "failed", "dropped"] {
            let _ = m.tasks.get_or_create(&Outcome {
                outcome: outcome.into(),
            });
        }
        let mut r = Registry::with_prefix("shardpress_worker");
        r.register("tasks", "Tasks ended, by outcome", m.tasks.clone());
        r.register("tasks_running", "Tasks running now", m.running.clone());
        r.register(
            "bytes_read",
            "Input bytes of completed tasks",
            m.bytes_read.clone(),
        );
        r.register(
            "bytes_written",
            "Output bytes uploaded by completed tasks",
            m.bytes_written.clone(),
        );
        r.register(
            "task_duration_seconds",
            "Seconds per task from lease to report",
            m.task_seconds.clone(),
        );
        r.register(
            "tensor_duration_seconds",
            "Seconds per tensor",
            m.tensor_seconds.clone(),
        );
        r.register(
            "pool_in_use_bytes",
            "Bytes of the memory pool in buffers",
            m.pool_in_use.clone(),
        );
        r.register(
            "pool_reserved_bytes",
            "Bytes of the memory pool reserved by running tasks",
            m.pool_reserved.clone(),
        );
        r.register(
            "pool_limit_bytes",
            "The memory pool's budget (0: no limit)",
            m.pool_limit.clone(),
        );
        (m, r)
    }

    /// Counts a task that ended with `outcome`.
    pub fn ended(&self, outcome: &str, seconds: f64) {
        self.tasks
            .get_or_create(&Outcome {
                outcome: outcome.into(),
            })
            .inc();
        self.task_seconds.observe(seconds);
    }

    /// Copies the pool's current figures into the gauges.
    pub fn sample_pool(&self, pool: &MemoryPool) {
        let stats = pool.stats();
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.pool_in_use.set(clamp(stats.in_use));
        self.pool_reserved.set(clamp(stats.reserved));
        self.pool_limit.set(pool.limit().map_or(0, clamp));
    }
}

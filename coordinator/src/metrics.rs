//! The coordinator's Prometheus metrics. Counters move as the worker API answers; the job and
//! task gauges are refreshed from the database by the sweep loop, so every replica reports
//! the same queue.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A `state` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct State {
    /// Job or task state.
    pub state: String,
}

/// Job states reported even when no job is in them.
const JOB_STATES: [&str; 6] = [
    "queued",
    "running",
    "finalizing",
    "succeeded",
    "failed",
    "cancelled",
];
/// Task states reported even when no task is in them.
const TASK_STATES: [&str; 5] = ["queued", "leased", "succeeded", "failed", "cancelled"];

/// Every metric of the coordinator, and the registry that exports them.
#[derive(Debug)]
pub struct Metrics {
    /// Tasks handed to workers (each attempt counts).
    pub tasks_leased: Counter,
    /// Leases of tasks that had run before (a retry after a failure or an expiry).
    pub tasks_retried: Counter,
    /// Completions accepted.
    pub tasks_completed: Counter,
    /// Failure reports accepted.
    pub tasks_failed: Counter,
    /// Completions or failure reports refused because the lease was stale.
    pub reports_refused: Counter,
    /// Leases that ran out without a heartbeat.
    pub lease_expiries: Counter,
    /// Output bytes of accepted completions.
    pub bytes_written: Counter,
    /// Input bytes of the tasks of accepted completions.
    pub bytes_read: Counter,
    /// Seconds from a task's first lease to its accepted completion.
    pub task_seconds: Histogram,
    /// Jobs by state.
    pub jobs: Family<State, Gauge>,
    /// Tasks of unfinished jobs by state; `queued` is the queue depth.
    pub tasks: Family<State, Gauge>,
}

impl Metrics {
    /// Metrics at zero and the registry holding them.
    pub fn new() -> (Self, Registry) {
        let m = Metrics {
            tasks_leased: Counter::default(),
            tasks_retried: Counter::default(),
            tasks_completed: Counter::default(),
            tasks_failed: Counter::default(),
            reports_refused: Counter::default(),
            lease_expiries: Counter::default(),
            bytes_written: Counter::default(),
            bytes_read: Counter::default(),
            task_seconds: Histogram::new(shardpress_proto::metrics::task_seconds_buckets()),
            jobs: Family::default(),
            tasks: Family::default(),
        };
        let mut r = Registry::with_prefix("shardpress");
        r.register(
            "tasks_leased",
            "Task leases handed to workers",
            m.tasks_leased.clone(),
        );
        r.register(
            "tasks_retried",
            "Leases of tasks that had been leased before",
            m.tasks_retried.clone(),
        );
        r.register(
            "tasks_completed",
            "Task completions accepted",
            m.tasks_completed.clone(),
        );
        r.register(
            "tasks_failed",
            "Task failure reports accepted",
            m.tasks_failed.clone(),
        );
        r.register(
            "reports_refused",
            "Completions and failure reports refused for a stale lease",
            m.reports_refused.clone(),
        );
        r.register(
            "lease_expiries",
            "Leases that ran out without a heartbeat",
            m.lease_expiries.clone(),
        );
        r.register(
            "bytes_written",
            "Output bytes of accepted completions",
            m.bytes_written.clone(),
        );
        r.register(
            "bytes_read",
            "Input bytes of the tasks of accepted completions",
            m.bytes_read.clone(),
        );
        r.register(
            "task_duration_seconds",
            "Seconds from a task's first lease to its accepted completion",
            m.task_seconds.clone(),
        );
        r.register("jobs", "Jobs by state", m.jobs.clone());
        r.register(
            "tasks",
            "Tasks of unfinished jobs by state (queued is the queue depth)",
            m.tasks.clone(),
        );
        (m, r)
    }

    /// Sets the job and task gauges from `(state, count)` rows; states absent are zero.
    pub fn set_states(&self, jobs: &[(String, i64)], tasks: &[(String, i64)]) {
        for (family, states, rows) in [
            (&self.jobs, &JOB_STATES[..], jobs),
            (&self.tasks, &TASK_STATES[..], tasks),
        ] {
            for s in states {
                let n = rows.iter().find(|(st, _)| st == s).map_or(0, |(_, n)| *n);
                family
                    .get_or_create(&State {
                        state: (*s).to_string(),
                    })
                    .set(n);
            }
        }
    }
}

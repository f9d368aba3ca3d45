//! A byte-budgeted memory pool shared by every task and thread of a process.
//!
//! Work takes memory in two steps. A task first [reserves](MemoryPool::reserve) the most it
//! will hold at once; reservations are granted first come, first served, and wait while the
//! budget is spent (backpressure), so many small tasks run side by side and a task that needs
//! the whole budget runs alone. Inside its reservation the task takes
//! [buffers](Reservation::buffer), which come from a cache of returned allocations when one
//! fits, and [charges](Reservation::charge) memory it allocates itself. A task never waits
//! once it holds a reservation, so no set of tasks can deadlock on the pool.
//!
//! The pool keeps `reserved ≤ limit`, and `live + cached ≤ limit` for the bytes actually
//! allocated: cached allocations are released before a new one would overshoot.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Bytes per word of a pooled buffer; buffers are kept as `u64` words so they can be viewed
/// as `f32` or `u32` without copying.
const WORD: usize = 8;

/// Why memory cannot be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// A reservation larger than the whole budget.
    #[error("needs {need} bytes but the memory limit is {limit} bytes")]
    TooLarge {
        /// Bytes asked for.
        need: u64,
        /// The budget.
        limit: u64,
    },
    /// A buffer or charge beyond what the reservation holds: the reservation was sized wrong.
    #[error("needs {need} more bytes but only {left} of its {reserved}-byte reservation are left")]
    OverReservation {
        /// Bytes asked for.
        need: u64,
        /// Bytes still free in the reservation.
        left: u64,
        /// Size of the reservation.
        reserved: u64,
    },
}

/// What the pool has seen, for reports and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PoolStats {
    /// The budget in bytes (`u64::MAX` without a limit).
    pub limit: u64,
    /// Bytes reserved right now.
    pub reserved: u64,
    /// Most bytes reserved at once.
    pub peak_reserved: u64,
    /// Bytes in buffers and charges right now.
    pub in_use: u64,
    /// Most bytes in buffers and charges at once.
    pub peak_in_use: u64,
    /// Bytes of returned buffers kept for reuse.
    pub cached: u64,
    /// Reservations granted.
    pub reservations: u64,
    /// Reservations that had to wait for memory.
    pub waits: u64,
    /// Total time reservations waited, in milliseconds.
    pub wait_ms: u64,
    /// Buffers handed out.
    pub buffers: u64,
    /// Buffers that reused a cached allocation.
    pub reused: u64,
}

impl PoolStats {
    /// Fraction of buffers that reused an allocation (0 when none were taken).
    pub fn reuse_rate(&self) -> f64 {
        if self.buffers == 0 {
            0.0
        } else {
            self.reused as f64 / self.buffers as f64
        }
    }

    /// The limit, or `None` when unlimited.
    pub fn limit(&self) -> Option<u64> {
        (self.limit != u64::MAX).then_some(self.limit)
    }
}

#[derive(Debug, Default)]
struct State {
    reserved: u64,
    in_use: u64,
    cache: Vec<Vec<u64>>,
    cached: u64,
    next_ticket: u64,
    serving: u64,
    stats: PoolStats,
}

impl State {
    fn sync_stats(&mut self) {
        self.stats.reserved = self.reserved;
        self.stats.in_use = self.in_use;
        self.stats.cached = self.cached;
        self.stats.peak_reserved = self.stats.peak_reserved.max(self.reserved);
        self.stats.peak_in_use = self.stats.peak_in_use.max(self.in_use);
    }
}

#[derive(Debug)]
struct Shared {
    limit: u64,
    state: Mutex<State>,
    freed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves only counters behind; keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A byte budget with reusable buffers. Cheap to clone; clones share the budget.
#[derive(Debug, Clone)]
pub struct MemoryPool {
    shared: Arc<Shared>,
}

impl MemoryPool {
    /// A pool holding at most `limit` bytes (`None`: no limit, buffers still reused).
    pub fn new(limit: Option<u64>) -> Self {
        let limit = limit.unwrap_or(u64::MAX);
        Self {
            shared: Arc::new(Shared {
                limit,
                state: Mutex::new(State {
                    stats: PoolStats {
                        limit,
                        ..PoolStats::default()
                    },
                    ..State::default()
                }),
                freed: Condvar::new(),
            }),
        }
    }

    /// A pool without a limit.
    pub fn unlimited() -> Self {
        Self::new(None)
    }

    /// The budget, or `None` without a limit.
    pub fn limit(&self) -> Option<u64> {
        (self.shared.limit != u64::MAX).then_some(self.shared.limit)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> PoolStats {
        self.shared.lock().stats
    }

    /// Reserves `bytes`, waiting (in arrival order) until they are free. Fails only when
    /// `bytes` exceeds the whole budget.
    pub fn reserve(&self, bytes: u64) -> Result<Reservation, PoolError> {
        let limit = self.shared.limit;
        if bytes > limit {
            return Err(PoolError::TooLarge { need: bytes, limit });
        }
        let mut st = self.shared.lock();
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        let mut waited: Option<std::time::Instant> = None;
        while st.serving != ticket || st.reserved + bytes > limit {
            if waited.is_none() {
                waited = Some(std::time::Instant::now());
                st.stats.waits += 1;
            }
            st = self
                .shared
                .freed
                .wait(st)
                .unwrap_or_else(|e| e.into_inner());
        }
        st.serving += 1;
        st.reserved += bytes;
        st.stats.reservations += 1;
        let wait_ms = waited.map_or(0, |t| t.elapsed().as_millis() as u64);
        st.stats.wait_ms += wait_ms;
        st.sync_stats();
        drop(st);
        // The next ticket may fit too.
        self.shared.freed.notify_all();
        Ok(Reservation {
            inner: Arc::new(ResInner {
                pool: self.shared.clone(),
                bytes,
                taken: AtomicU64::new(0),
                peak: AtomicU64::new(0),
                buffers: AtomicU64::new(0),
                reused: AtomicU64::new(0),
                wait_ms,
            }),
        })
    }
}

#[derive(Debug)]
struct ResInner {
    pool: Arc<Shared>,
    bytes: u64,
    taken: AtomicU64,
    peak: AtomicU64,
    buffers: AtomicU64,
    reused: AtomicU64,
    wait_ms: u64,
}

/// What one reservation saw: the memory of one task.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReservationStats {
    /// Bytes reserved.
    pub reserved: u64,
    /// Most bytes in buffers and charges at once.
    pub peak: u64,
    /// Time spent waiting for the reservation, in milliseconds.
    pub wait_ms: u64,
    /// Buffers taken.
    pub buffers: u64,
    /// Buffers that reused a cached allocation.
    pub reused: u64,
}

impl ResInner {
    /// Counts `n` more bytes against the reservation.
    fn take(&self, n: u64) -> Result<(), PoolError> {
        let mut cur = self.taken.load(Ordering::Relaxed);
        loop {
            let left = self.bytes - cur;
            if n > left {
                return Err(PoolError::OverReservation {
                    need: n,
                    left,
                    reserved: self.bytes,
                });
            }
            match self.taken.compare_exchange_weak(
                cur,
                cur + n,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    self.peak.fetch_max(cur + n, Ordering::Relaxed);
                    return Ok(());
                }
                Err(now) => cur = now,
            }
        }
    }

    fn give_back(&self, n: u64) {
        self.taken.fetch_sub(n, Ordering::Relaxed);
    }
}

impl Drop for ResInner {
    fn drop(&mut self) {
        let mut st = self.pool.lock();
        st.reserved -= self.bytes;
        st.sync_stats();
        drop(st);
        self.pool.freed.notify_all();
    }
}

/// Memory granted to one task; released when it and every buffer taken from it are dropped.
#[derive(Debug, Clone)]
pub struct Reservation {
    inner: Arc<ResInner>,
}

impl Reservation {
    /// Bytes reserved.
    pub fn bytes(&self) -> u64 {
        self.inner.bytes
    }

    /// What this reservation has seen so far.
    pub fn stats(&self) -> ReservationStats {
        let i = &self.inner;
        ReservationStats {
            reserved: i.bytes,
            peak: i.peak.load(Ordering::Relaxed),
            wait_ms: i.wait_ms,
            buffers: i.buffers.load(Ordering::Relaxed),
            reused: i.reused.load(Ordering::Relaxed),
        }
    }

    /// Bytes of the reservation not yet taken by buffers or charges.
    pub fn available(&self) -> u64 {
        self.inner.bytes - self.inner.taken.load(Ordering::Relaxed)
    }

    /// Bytes a buffer of `len` bytes takes from a reservation (allocations are whole words).
    pub fn buffer_cost(len: usize) -> u64 {
        (len.div_ceil(WORD) * WORD) as u64
    }

    /// A buffer of `len` bytes; its contents are unspecified (fill it before reading). Reuses
    /// a cached allocation when one fits.
    pub fn buffer(&self, len: usize) -> Result<PoolBuf, PoolError> {
        let words = len.div_ceil(WORD);
        let bytes = (words * WORD) as u64;
        self.inner.take(bytes)?;
        let pool = &self.inner.pool;
        let mut st = pool.lock();
        // The smallest cached allocation that holds `words`, cut to size (cheap in place).
        let best = st
            .cache
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= words)
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i);
        let reused = match best {
            Some(i) => {
                let v = st.cache.swap_remove(i);
                st.cached -= (v.capacity() * WORD) as u64;
                Some(v)
            }
            None => {
                // Make room: cached allocations go before live ones may overshoot the limit.
                while st.in_use + st.cached + bytes > pool.limit && !st.cache.is_empty() {
                    let largest = st
                        .cache
                        .iter()
                        .enumerate()
                        .max_by_key(|(_, v)| v.capacity())
                        .map(|(i, _)| i)
                        .unwrap_or(0);
                    let v = st.cache.swap_remove(largest);
                    st.cached -= (v.capacity() * WORD) as u64;
                }
                None
            }
        };
        st.in_use += bytes;
        st.stats.buffers += 1;
        self.inner.buffers.fetch_add(1, Ordering::Relaxed);
        if reused.is_some() {
            st.stats.reused += 1;
            self.inner.reused.fetch_add(1, Ordering::Relaxed);
        }
        st.sync_stats();
        drop(st);
        // Allocate or trim outside the lock.
        let words_vec = match reused {
            Some(mut v) => {
                v.truncate(words);
                v.shrink_to(words);
                v.resize(words, 0);
                v
            }
            None => vec![0u64; words],
        };
        Ok(PoolBuf {
            words: words_vec,
            len,
            cap_bytes: bytes,
            res: self.inner.clone(),
        })
    }

    /// Counts `bytes` allocated outside the pool (kernel outputs and temporaries) against
    /// the reservation until the returned guard is dropped.
    pub fn charge(&self, bytes: u64) -> Result<Charge, PoolError> {
        self.inner.take(bytes)?;
        let pool = &self.inner.pool;
        let mut st = pool.lock();
        while st.in_use + st.cached + bytes > pool.limit && !st.cache.is_empty() {
            if let Some(v) = st.cache.pop() {
                st.cached -= (v.capacity() * WORD) as u64;
            }
        }
        st.in_use += bytes;
        st.sync_stats();
        Ok(Charge {
            bytes,
            res: self.inner.clone(),
        })
    }
}

/// Bytes counted against a reservation; released on drop.
#[derive(Debug)]
pub struct Charge {
    bytes: u64,
    res: Arc<ResInner>,
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.res.give_back(self.bytes);
        let mut st = self.res.pool.lock();
        st.in_use -= self.bytes;
        st.sync_stats();
    }
}

/// A buffer from the pool; its allocation returns to the pool's cache when dropped.
#[derive(Debug)]
pub struct PoolBuf {
    words: Vec<u64>,
    len: usize,
    cap_bytes: u64,
    res: Arc<ResInner>,
}

impl PoolBuf {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.len]
    }

    /// The bytes, writable.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.words)[..self.len]
    }

    /// The first `len / 4` whole `f32`s, writable.
    pub fn f32s_mut(&mut self) -> &mut [f32] {
        let n = self.len / 4;
        &mut bytemuck::cast_slice_mut(&mut self.words)[..n]
    }

    /// The first `len / 4` whole `f32`s.
    pub fn f32s(&self) -> &[f32] {
        let n = self.len / 4;
        &bytemuck::cast_slice(&self.words)[..n]
    }

    /// Shortens the buffer to `len` bytes (no-op when longer); the allocation is kept.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

impl Drop for PoolBuf {
    fn drop(&mut self) {
        let words = std::mem::take(&mut self.words);
        self.res.give_back(self.cap_bytes);
        let pool = &self.res.pool;
        let mut st = pool.lock();
        st.in_use -= self.cap_bytes;
        let cap = (words.capacity() * WORD) as u64;
        if cap > 0 && st.in_use + st.cached + cap <= pool.limit {
            st.cached += cap;
            st.cache.push(words);
        }
        st.sync_stats();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    #[test]
    fn buffers_are_reused_and_counted() {
        let pool = MemoryPool::new(Some(1 << 20));
        let res = pool.reserve(64 << 10).expect("reserve");
        let mut a = res.buffer(10_000).expect("buffer");
        assert_eq!(a.len(), 10_000);
        a.bytes_mut()[9_999] = 7;
        assert_eq!(res.available(), (64 << 10) - 10_000);
        drop(a);
        assert_eq!(res.available(), 64 << 10);
        let b = res.buffer(9_000).expect("buffer");
        let s = pool.stats();
        assert_eq!((s.buffers, s.reused), (2, 1));
        assert_eq!(s.in_use, 9_000, "the reused allocation is cut to size");
        assert_eq!(s.reuse_rate(), 0.5);
        drop(b);
        let r = res.stats();
        assert_eq!(
            (r.reserved, r.peak, r.buffers, r.reused),
            (64 << 10, 10_000, 2, 1)
        );
        drop(res);
        let s = pool.stats();
        assert_eq!((s.reserved, s.in_use, s.peak_reserved), (0, 0, 64 << 10));
        assert_eq!(s.cached, 9_000);
    }

    #[test]
    fn a_reservation_cannot_be_overdrawn_and_the_limit_is_hard() {
        let pool = MemoryPool::new(Some(1000));
        assert_eq!(
            pool.reserve(1001).err(),
            Some(PoolError::TooLarge {
                need: 1001,
                limit: 1000
            })
        );
        let res = pool.reserve(800).expect("reserve");
        let _a = res.buffer(600).expect("fits");
        let e = res.buffer(400).expect_err("over");
        assert!(
            matches!(e, PoolError::OverReservation { left: 200, .. }),
            "{e}"
        );
        let _c = res.charge(200).expect("charge");
        assert!(res.charge(1).is_err());
    }

    #[test]
    fn cached_allocations_make_room_for_new_ones() {
        let pool = MemoryPool::new(Some(4096));
        let res = pool.reserve(4096).expect("reserve");
        drop(res.buffer(3000).expect("buffer"));
        assert_eq!(pool.stats().cached, 3000);
        // A larger buffer cannot reuse the cached one; it is freed so the total stays in budget.
        let big = res.buffer(4000).expect("buffer");
        let s = pool.stats();
        assert_eq!((s.in_use, s.cached), (4000, 0));
        drop(big);
    }

    #[test]
    fn reservations_wait_and_never_exceed_the_budget() {
        let pool = MemoryPool::new(Some(100));
        let live = Arc::new(AtomicU64::new(0));
        let over = Arc::new(AtomicBool::new(false));
        std::thread::scope(|s| {
            for i in 0..8u64 {
                let (pool, live, over) = (pool.clone(), live.clone(), over.clone());
                s.spawn(move || {
                    for _ in 0..5 {
                        let need = 32 + 8 * (i % 3);
                        let res = pool.reserve(need).expect("reserve");
                        let _buf = res.buffer(need as usize).expect("buffer");
                        let now = live.fetch_add(need, Ordering::SeqCst) + need;
                        if now > 100 {
                            over.store(true, Ordering::SeqCst);
                        }
                        std::thread::sleep(Duration::from_millis(2));
                        live.fetch_sub(need, Ordering::SeqCst);
                    }
                });
            }
        });
        let s = pool.stats();
        assert!(
            !over.load(Ordering::SeqCst),
            "more than the budget was live"
        );
        assert_eq!(s.reservations, 40);
        assert!(
            s.waits > 0,
            "eight threads on a budget for two or three must wait: {s:?}"
        );
        assert!(s.peak_reserved <= 100 && s.peak_in_use <= 100, "{s:?}");
        assert_eq!((s.reserved, s.in_use), (0, 0));
    }

    #[test]
    fn a_whole_budget_reservation_runs_alone_and_is_not_starved() {
        let pool = MemoryPool::new(Some(100));
        let small = pool.reserve(10).expect("small");
        let order = Arc::new(Mutex::new(Vec::new()));
        std::thread::scope(|s| {
            let (p, o) = (pool.clone(), order.clone());
            let big = s.spawn(move || {
                let r = p.reserve(100).expect("big");
                o.lock().map(|mut v| v.push("big")).ok();
                drop(r);
            });
            // Let the big request queue up first.
            while pool.stats().waits == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
            let (p, o) = (pool.clone(), order.clone());
            let later = s.spawn(move || {
                let _r = p.reserve(10).expect("later");
                o.lock().map(|mut v| v.push("later")).ok();
            });
            std::thread::sleep(Duration::from_millis(20));
            assert!(order.lock().map(|v| v.is_empty()).unwrap_or(false));
            drop(small);
            big.join().ok();
            later.join().ok();
        });
        let order = order.lock().map(|v| v.clone()).unwrap_or_default();
        assert_eq!(order, vec!["big", "later"], "arrival order is kept");
    }
}

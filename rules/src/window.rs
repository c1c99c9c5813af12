//! Fixed-capacity ring buffers with incremental statistics.
//!
//! A [`Ring`] is sized once, when its (rule, device) state is created, from the window the
//! rule names; it never grows. `heapless::HistoryBuf` would need the capacity as a const
//! generic, but capacities come from rule text at run time, so the buffer is a boxed slice
//! allocated exactly once.
//!
//! Mean and variance are kept incrementally (Welford's update, with a matching downdate
//! when a sample leaves) and recomputed exactly from the buffer every `cap` pushes, which
//! costs O(1) amortised and stops floating-point drift from accumulating over long runs.
//! Quantile windows also keep a sorted copy, updated by binary search and one `copy_within`
//! per push, so median, percentiles and the median absolute deviation need no sorting.
//! Readings are finite (the engine refuses NaN and infinities), so the order is total.

#[derive(Debug, Clone)]
pub(crate) struct Ring {
    vals: Box<[f64]>,
    /// Timestamps, only for time windows (empty otherwise).
    ts: Box<[u64]>,
    /// Sorted copy of the live values, only for quantile windows (empty otherwise).
    sorted: Box<[f64]>,
    head: usize,
    len: usize,
    mean: f64,
    m2: f64,
    since_resum: usize,
    /// How many of the newest samples equal the newest one. When it covers the whole window
    /// the statistics are exact (a stuck sensor reads exactly constant, with a standard
    /// deviation of exactly zero, whatever rounding the downdates left behind).
    same: usize,
}

impl Ring {
    pub(crate) fn new(cap: usize, timed: bool, sorted: bool) -> Ring {
        let cap = cap.max(1);
        Ring {
            vals: vec![0.0; cap].into_boxed_slice(),
            ts: if timed {
                vec![0; cap].into_boxed_slice()
            } else {
                Box::default()
            },
            sorted: if sorted {
                vec![0.0; cap].into_boxed_slice()
            } else {
                Box::default()
            },
            head: 0,
            len: 0,
            mean: 0.0,
            m2: 0.0,
            since_resum: 0,
            same: 0,
        }
    }

    /// Bytes this ring allocates on the heap, for the compile-time budget.
    pub(crate) fn heap_bytes(cap: usize, timed: bool, sorted: bool) -> usize {
        cap * (8 + if timed { 8 } else { 0 } + if sorted { 8 } else { 0 })
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_full(&self) -> bool {
        self.len == self.vals.len()
    }

    /// Adds `x` (at time `ts`), returning true if an older sample had to leave to make room.
    pub(crate) fn push(&mut self, ts: u64, x: f64) -> bool {
        let cap = self.vals.len();
        let evicted = self.len == cap;
        if evicted {
            self.pop_oldest();
        }
        let idx = (self.head + self.len) % cap;
        let newest = (self.head + self.len + cap - 1) % cap;
        self.same = if self.len > 0 && self.vals[newest] == x {
            self.same + 1
        } else {
            1
        };
        self.vals[idx] = x;
        if !self.ts.is_empty() {
            self.ts[idx] = ts;
        }
        self.len += 1;
        if !self.sorted.is_empty() {
            let n = self.len - 1;
            let at = self.sorted[..n].partition_point(|v| *v < x);
            self.sorted.copy_within(at..n, at + 1);
            self.sorted[at] = x;
        }
        // Welford update.
        let d = x - self.mean;
        self.mean += d / self.len as f64;
        self.m2 += d * (x - self.mean);
        self.since_resum += 1;
        if self.since_resum >= cap {
            self.resum();
        }
        evicted
    }

    fn pop_oldest(&mut self) {
        if self.len == 0 {
            return;
        }
        let cap = self.vals.len();
        let y = self.vals[self.head];
        self.head = (self.head + 1) % cap;
        self.len -= 1;
        if !self.sorted.is_empty() {
            let n = self.len + 1;
            let at = self.sorted[..n].partition_point(|v| *v < y).min(n - 1);
            self.sorted.copy_within(at + 1..n, at);
        }
        if self.len == 0 {
            self.mean = 0.0;
            self.m2 = 0.0;
        } else {
            // Welford downdate.
            let d = y - self.mean;
            self.mean -= d / self.len as f64;
            self.m2 -= d * (y - self.mean);
        }
    }

    /// Drops samples whose age is `horizon_ms` or more at time `now`. Time windows only.
    pub(crate) fn expire(&mut self, now: u64, horizon_ms: u64) {
        if self.ts.is_empty() {
            return;
        }
        while self.len > 0 && self.ts[self.head].saturating_add(horizon_ms) <= now {
            self.pop_oldest();
        }
    }

    fn resum(&mut self) {
        self.since_resum = 0;
        let (a, b) = self.slices();
        let n = self.len as f64;
        if self.len == 0 {
            self.mean = 0.0;
            self.m2 = 0.0;
            return;
        }
        let mean = (a.iter().sum::<f64>() + b.iter().sum::<f64>()) / n;
        let m2 = a.iter().chain(b).map(|v| (v - mean) * (v - mean)).sum();
        self.mean = mean;
        self.m2 = m2;
    }

    /// The live values, oldest first, as two slices.
    pub(crate) fn slices(&self) -> (&[f64], &[f64]) {
        let cap = self.vals.len();
        let end = self.head + self.len;
        if end <= cap {
            (&self.vals[self.head..end], &[])
        } else {
            (&self.vals[self.head..], &self.vals[..end - cap])
        }
    }

    fn constant(&self) -> Option<f64> {
        (self.len > 0 && self.same >= self.len)
            .then(|| self.vals[(self.head + self.len - 1) % self.vals.len()])
    }

    pub(crate) fn mean(&self) -> f64 {
        if self.len == 0 {
            f64::NAN
        } else {
            self.constant().unwrap_or(self.mean)
        }
    }

    pub(crate) fn sum(&self) -> f64 {
        self.mean() * self.len as f64
    }

    /// Population standard deviation.
    pub(crate) fn stddev(&self) -> f64 {
        if self.len == 0 {
            f64::NAN
        } else if self.constant().is_some() {
            0.0
        } else {
            (self.m2.max(0.0) / self.len as f64).sqrt()
        }
    }

    pub(crate) fn min(&self) -> f64 {
        if self.len == 0 {
            return f64::NAN;
        }
        if !self.sorted.is_empty() {
            return self.sorted[0];
        }
        let (a, b) = self.slices();
        a.iter().chain(b).fold(f64::INFINITY, |m, v| m.min(*v))
    }

    pub(crate) fn max(&self) -> f64 {
        if self.len == 0 {
            return f64::NAN;
        }
        if !self.sorted.is_empty() {
            return self.sorted[self.len - 1];
        }
        let (a, b) = self.slices();
        a.iter().chain(b).fold(f64::NEG_INFINITY, |m, v| m.max(*v))
    }

    /// Quantile `q` in `[0, 1]` by linear interpolation between closest ranks (the
    /// "type 7" definition used by numpy and R). Needs a sorted ring.
    pub(crate) fn quantile(&self, q: f64) -> f64 {
        quantile_sorted(&self.sorted[..self.len], q)
    }

    /// Median absolute deviation (unscaled) and median. Needs a sorted ring.
    ///
    /// The distances to the median, walked outwards from it on both sides, form two
    /// ascending runs; merging them up to the middle rank finds the MAD in O(n/2) with no
    /// scratch buffer.
    pub(crate) fn mad(&self) -> (f64, f64) {
        let s = &self.sorted[..self.len];
        let n = s.len();
        if n == 0 {
            return (f64::NAN, f64::NAN);
        }
        let m = quantile_sorted(s, 0.5);
        let k = s.partition_point(|v| *v < m);
        let (mut i, mut j) = (k, k); // next left candidate is s[i-1], next right is s[j]
        let (lo_rank, hi_rank) = ((n - 1) / 2, n / 2);
        let mut lo = 0.0;
        let mut rank = 0;
        loop {
            let left = if i > 0 { m - s[i - 1] } else { f64::INFINITY };
            let right = if j < n { s[j] - m } else { f64::INFINITY };
            let d = if left <= right {
                i -= 1;
                left
            } else {
                j += 1;
                right
            };
            if rank == lo_rank {
                lo = d;
            }
            if rank == hi_rank {
                return ((lo + d) / 2.0, m);
            }
            rank += 1;
        }
    }
}

pub(crate) fn quantile_sorted(s: &[f64], q: f64) -> f64 {
    let n = s.len();
    if n == 0 {
        return f64::NAN;
    }
    let h = (n - 1) as f64 * q;
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(n - 1);
    s[lo] + (h - lo as f64) * (s[hi] - s[lo])
}

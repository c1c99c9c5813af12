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
            // Replacing the oldest sample in the sorted copy moves only the values between
            // its position and the new one's: one short memmove instead of two long ones.
            let old = self.vals[self.head];
            if !self.sorted.is_empty() {
                replace_sorted(&mut self.sorted[..self.len], old, x);
            }
            self.head = (self.head + 1) % cap;
            self.len -= 1;
            if self.len == 0 {
                self.mean = 0.0;
                self.m2 = 0.0;
            } else {
                let d = old - self.mean;
                self.mean -= d / self.len as f64;
                self.m2 -= d * (old - self.mean);
            }
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
        if !self.sorted.is_empty() && !evicted {
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
    /// The distances to the median, read outwards from it on both sides of the sorted copy,
    /// form two ascending sequences; the MAD is the middle element of their union, found by
    /// the classic k-th-of-two-sorted-arrays binary search in O(log n), with no scratch
    /// buffer.
    pub(crate) fn mad(&self) -> (f64, f64) {
        let s = &self.sorted[..self.len];
        let n = s.len();
        if n == 0 {
            return (f64::NAN, f64::NAN);
        }
        let m = quantile_sorted(s, 0.5);
        // Any split with s[..k] <= m <= s[k..] works, and the middle one always is.
        let k = n / 2;
        let left = |t: usize| m - s[k - 1 - t]; // k values up to m, nearest first
        let right = |t: usize| s[k + t] - m; // n - k values from m up, nearest first
        let (lo, next) = kth_of_two(left, k, right, n - k, (n - 1) / 2);
        let hi = if n % 2 == 0 { next } else { lo };
        ((lo + hi) / 2.0, m)
    }
}

/// The `r`-th and `r + 1`-th smallest (0-based) elements of the union of two ascending
/// sequences given by accessors, in O(log) steps. Requires `r < na + nb`; the second is
/// infinite when `r` is the last rank.
fn kth_of_two<A: Fn(usize) -> f64, B: Fn(usize) -> f64>(
    a: A,
    na: usize,
    b: B,
    nb: usize,
    r: usize,
) -> (f64, f64) {
    // Find how many of the r + 1 smallest come from `a`: the least i with a[i] >= b[j - 1].
    let (mut lo, mut hi) = ((r + 1).saturating_sub(nb), (r + 1).min(na));
    while lo < hi {
        let i = (lo + hi) / 2;
        let j = r + 1 - i;
        if j > 0 && a(i) < b(j - 1) {
            lo = i + 1;
        } else {
            hi = i;
        }
    }
    let i = lo;
    let j = r + 1 - i;
    let x = if i > 0 { a(i - 1) } else { f64::NEG_INFINITY };
    let y = if j > 0 { b(j - 1) } else { f64::NEG_INFINITY };
    let nx = if i < na { a(i) } else { f64::INFINITY };
    let ny = if j < nb { b(j) } else { f64::INFINITY };
    (x.max(y), nx.min(ny))
}

/// Replaces one occurrence of `old` with `new` in the ascending slice `s`, keeping it sorted.
fn replace_sorted(s: &mut [f64], old: f64, new: f64) {
    let n = s.len();
    let at = s.partition_point(|v| *v < old).min(n - 1);
    if new >= old {
        // Everything after `at` that is smaller than `new` moves one step left.
        let end = at + s[at + 1..].partition_point(|v| *v < new);
        s.copy_within(at + 1..=end, at);
        s[end] = new;
    } else {
        // Everything before `at` that is larger than `new` moves one step right.
        let start = s[..at].partition_point(|v| *v <= new);
        s.copy_within(start..at, start + 1);
        s[start] = new;
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

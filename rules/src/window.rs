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
    /// The samples' values; empty for a ring that only counts (`count(x, 10s)` reads the
    /// number of live samples and nothing else).
    vals: Box<[f64]>,
    /// Timestamps, only for time windows (empty otherwise), as offsets in ms from `base`:
    /// 32 bits hold 49 days, and no window may span more than a day
    /// ([`Limits::max_window_ms`](crate::Limits)).
    ts: Box<[u32]>,
    /// Sorted copy of the live values, only for quantile windows (empty otherwise).
    sorted: Box<[f64]>,
    /// Time the offsets in `ts` count from. Moves forward when a new offset would not fit.
    base: u64,
    cap: usize,
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
    /// A ring of `cap` samples. `timed` keeps timestamps (time windows), `sorted` a sorted
    /// copy (order statistics), and `values` the values themselves: a ring that only counts
    /// keeps none, and answers [`len`](Ring::len) only.
    pub(crate) fn new(cap: usize, timed: bool, sorted: bool, values: bool) -> Ring {
        let cap = cap.max(1);
        let boxed = |on: bool| {
            if on {
                vec![0.0; cap].into_boxed_slice()
            } else {
                Box::default()
            }
        };
        Ring {
            vals: boxed(values || sorted),
            ts: if timed {
                vec![0; cap].into_boxed_slice()
            } else {
                Box::default()
            },
            sorted: boxed(sorted),
            base: 0,
            cap,
            head: 0,
            len: 0,
            mean: 0.0,
            m2: 0.0,
            since_resum: 0,
            same: 0,
        }
    }

    /// Bytes this ring allocates on the heap, for the compile-time budget.
    pub(crate) fn heap_bytes(cap: usize, timed: bool, sorted: bool, values: bool) -> usize {
        let per_sample = if values || sorted { 8 } else { 0 }
            + if timed { 4 } else { 0 }
            + if sorted { 8 } else { 0 };
        cap.max(1) * per_sample
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn is_full(&self) -> bool {
        self.len == self.cap
    }

    /// Adds `x` (at time `ts`), returning true if an older sample had to leave to make room.
    pub(crate) fn push(&mut self, ts: u64, x: f64) -> bool {
        let cap = self.cap;
        if self.vals.is_empty() {
            return self.push_count_only(ts);
        }
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
        self.stamp(idx, ts);
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

    /// Starts loading what the next [`expire`](Ring::expire) and [`push`](Ring::push) read:
    /// the oldest and the next slot of the values and timestamps, and the whole sorted copy
    /// (a push's two binary searches over it would otherwise wait on one cache miss after
    /// another). Only the ring's own fields are read; the touches change nothing but the
    /// caches (see [`crate::prefetch`]).
    pub(crate) fn prefetch(&self) {
        let next = (self.head + self.len) % self.cap;
        for i in [self.head, next] {
            if let Some(v) = self.vals.get(i) {
                crate::prefetch::value(v);
            }
            if let Some(t) = self.ts.get(i) {
                crate::prefetch::value(t);
            }
        }
        crate::prefetch::slice(self.sorted.get(..self.len).unwrap_or_default());
    }

    /// [`push`](Ring::push) for a ring that keeps no values.
    fn push_count_only(&mut self, ts: u64) -> bool {
        let evicted = self.len == self.cap;
        if evicted {
            self.head = (self.head + 1) % self.cap;
            self.len -= 1;
        }
        let idx = (self.head + self.len) % self.cap;
        self.stamp(idx, ts);
        self.len += 1;
        evicted
    }

    /// Records `ts` as the timestamp of slot `idx`, which is about to become the newest
    /// sample (time windows only). The live samples are at `head..head + len`.
    fn stamp(&mut self, idx: usize, ts: u64) {
        if self.ts.is_empty() {
            return;
        }
        if self.len == 0 {
            self.base = ts;
        } else if ts - self.base.min(ts) > u64::from(u32::MAX) {
            self.rebase(ts);
        }
        // A timestamp older than the base (the engine passes only in-order readings of a
        // metric, but not every metric is tracked) counts as the base: the oldest live time.
        self.ts[idx] = u32::try_from(ts.saturating_sub(self.base)).unwrap_or(u32::MAX);
    }

    /// Moves the base up to the oldest live sample so that `ts` fits in 32 bits, first
    /// dropping live samples 49 days or more older than `ts` (no window spans more than a
    /// day, so a caller that expires before pushing never has any).
    fn rebase(&mut self, ts: u64) {
        let limit = u64::from(u32::MAX);
        while self.len > 0 && ts - self.time(self.head).min(ts) > limit {
            self.pop_oldest();
        }
        if self.len == 0 {
            self.base = ts;
            return;
        }
        let shift = self.ts[self.head];
        for i in 0..self.len {
            let at = (self.head + i) % self.cap;
            self.ts[at] -= shift;
        }
        self.base += u64::from(shift);
    }

    /// Timestamp of slot `idx` (time windows only).
    fn time(&self, idx: usize) -> u64 {
        self.base + u64::from(self.ts[idx])
    }

    fn pop_oldest(&mut self) {
        if self.len == 0 {
            return;
        }
        let cap = self.cap;
        self.head = (self.head + 1) % cap;
        self.len -= 1;
        if self.vals.is_empty() {
            return;
        }
        let y = self.vals[(self.head + cap - 1) % cap];
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
        while self.len > 0 && self.time(self.head).saturating_add(horizon_ms) <= now {
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
        let cap = self.cap;
        let end = self.head + self.len;
        if end <= cap {
            (&self.vals[self.head..end], &[])
        } else {
            (&self.vals[self.head..], &self.vals[..end - cap])
        }
    }

    fn constant(&self) -> Option<f64> {
        (self.len > 0 && self.same >= self.len)
            .then(|| self.vals[(self.head + self.len - 1) % self.cap])
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// After every push, the sorted copy holds exactly the live samples, in order. Few
        /// distinct values, so that the old and the new sample often have copies of
        /// themselves on both sides.
        #[test]
        fn the_sorted_copy_is_the_live_samples_sorted(
            cap in 1usize..40,
            xs in prop::collection::vec(0u8..6, 0..300),
        ) {
            let mut ring = Ring::new(cap, false, true, true);
            let mut live = std::collections::VecDeque::new();
            for (t, x) in xs.iter().enumerate() {
                let x = f64::from(*x) * 0.5;
                ring.push(t as u64, x);
                live.push_back(x);
                if live.len() > cap {
                    live.pop_front();
                }
                let mut want: Vec<f64> = live.iter().copied().collect();
                want.sort_by(f64::total_cmp);
                prop_assert_eq!(&ring.sorted[..ring.len], &want[..]);
            }
        }
    }
}

//! Property tests: every detector and window aggregate against a simple reference
//! implementation (recompute everything from the full history at every step) over random
//! streams. The detectors under test are built by the real compiler from rule text.

use proptest::prelude::*;

use crate::compile::compile_with;
use crate::detector::Det;
use crate::limits::Limits;
use crate::plan::{AggFn, DetSpec};
use crate::window::quantile_sorted;

/// Time windows in these tests keep at most this many samples, so early eviction happens.
const CAP: usize = 16;

fn spec(call: &str) -> DetSpec {
    let limits = Limits {
        time_window_samples: CAP,
        ..Limits::default()
    };
    let boolean = call.starts_with("flatline") || call.starts_with("missing");
    let cond = if boolean {
        call.to_string()
    } else {
        format!("{call} > 0")
    };
    let src = format!("rule r\n when {cond}\n alert info \"x\"");
    let plan = compile_with(&src, &limits).unwrap_or_else(|e| panic!("{call}: {e}"));
    plan.inner.rules[0].dets[0].clone()
}

fn close(a: f64, b: f64, rel: f64) -> bool {
    if a.is_nan() || b.is_nan() {
        return a.is_nan() && b.is_nan();
    }
    if a.is_infinite() || b.is_infinite() {
        return a == b;
    }
    (a - b).abs() <= rel * a.abs().max(b.abs()).max(1.0)
}

/// Relative tolerance. Order statistics are exact; incremental sums carry rounding of the
/// order of machine epsilon times the magnitude of the samples that passed through the window
/// recently (up to two window lengths before the next exact recomputation), so their
/// tolerance scales with that magnitude.
fn tolerance(name: &str, recent: &[f64]) -> f64 {
    let scale = recent.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    match name {
        "avg" | "sum" => 1e-12 * scale,
        "stddev" => 1e-7 * scale,
        _ => 1e-12,
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

fn pstddev(v: &[f64]) -> f64 {
    let m = mean(v);
    (v.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / v.len() as f64).sqrt()
}

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s
}

fn median(v: &[f64]) -> f64 {
    quantile_sorted(&sorted(v), 0.5)
}

/// Reference score: like the engine's, a spread that is zero (or rounding noise) means
/// "any deviation is infinitely unusual".
fn ref_score(x: f64, c: f64, s: f64) -> f64 {
    if s > 1e-9 * c.abs().max(1.0) {
        (x - c) / s
    } else if x == c {
        0.0
    } else if x > c {
        f64::INFINITY
    } else {
        f64::NEG_INFINITY
    }
}

fn agg(name: &str, v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        // Like SQL: the count of nothing is 0, every other statistic of nothing is unknown.
        return if name == "count" { 0.0 } else { f64::NAN };
    }
    match name {
        "avg" => mean(v),
        "min" => v.iter().cloned().fold(f64::INFINITY, f64::min),
        "max" => v.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
        "sum" => v.iter().sum(),
        "count" => v.len() as f64,
        "stddev" => pstddev(v),
        "median" => median(v),
        "percentile" => quantile_sorted(&sorted(v), q),
        _ => unreachable!(),
    }
}

/// Streams: (gap in ms, value). Values mix a few repeated integers (ties, flat runs, zero
/// spreads) with uniform reals.
fn stream() -> impl Strategy<Value = Vec<(u64, f64)>> {
    let value = prop_oneof![(-3i32..4).prop_map(f64::from), -1000.0f64..1000.0];
    prop::collection::vec((0u64..3000, value), 1..300)
}

/// Streams of readings 1 to 12 hours apart, now and then a burst of them milliseconds
/// apart: 250-400 readings span about 80 days on average (up to 200).
fn long_stream() -> impl Strategy<Value = Vec<(u64, f64)>> {
    let gap = prop_oneof![1 => 0u64..3000, 9 => 3_600_000u64..43_200_000];
    let value = prop_oneof![(-3i32..4).prop_map(f64::from), -1000.0f64..1000.0];
    prop::collection::vec((gap, value), 250..400)
}

/// Runs `name` over a time window of `window` (rule text) spanning `horizon` ms against
/// the reference, probing at each reading and `probe` ms after it.
fn check_time_window(
    s: &[(u64, f64)],
    window: &str,
    horizon: u64,
    name: &str,
    p: u32,
    probe: u64,
) -> Result<(), TestCaseError> {
    let call = if name == "percentile" {
        format!("percentile(x, {p}, {window})")
    } else {
        format!("{name}(x, {window})")
    };
    let mut det = Det::new(&spec(&call), 0);
    let mut hist: Vec<(u64, f64)> = Vec::new();
    let mut ts = 0;
    for &(dt, x) in s {
        ts += dt;
        det.update(ts, x);
        hist.push((ts, x));
        // Probe at the reading, and a little later as a tick or another metric would.
        for now in [ts, ts + probe] {
            let live: Vec<f64> = hist
                .iter()
                .filter(|(t, _)| t + horizon > now)
                .map(|(_, v)| *v)
                .collect();
            let w = &live[live.len().saturating_sub(CAP)..];
            // Samples evicted early for room never come back, even if later ones expire.
            let kept: Vec<f64> = hist[hist.len().saturating_sub(CAP)..]
                .iter()
                .filter(|(t, _)| t + horizon > now)
                .map(|(_, v)| *v)
                .collect();
            prop_assert_eq!(w.len(), kept.len());
            let want = agg(name, w, f64::from(p) / 100.0);
            let got = det.value(now);
            let recent: Vec<f64> = hist[hist.len().saturating_sub(2 * CAP)..]
                .iter()
                .map(|(_, v)| *v)
                .collect();
            let tol = tolerance(name, &recent);
            prop_assert!(
                close(got, want, tol),
                "{call} at {now}: got {got}, want {want}"
            );
        }
        // The probe moved time forward for the detector; keep the stream monotonic.
        ts += probe;
    }
    Ok(())
}

const AGGS: &[&str] = &[
    "avg",
    "min",
    "max",
    "sum",
    "count",
    "stddev",
    "median",
    "percentile",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn sample_window_aggregates(s in stream(), n in 1usize..40, which in 0..AGGS.len(), p in 0u32..=100) {
        let name = AGGS[which];
        let call = if name == "percentile" { format!("percentile(x, {p}, {n})") } else { format!("{name}(x, {n} samples)") };
        let mut det = Det::new(&spec(&call), 0);
        let mut hist = Vec::new();
        let mut ts = 0;
        for (dt, x) in s {
            ts += dt;
            det.update(ts, x);
            hist.push(x);
            let w = &hist[hist.len().saturating_sub(n)..];
            let want = agg(name, w, f64::from(p) / 100.0);
            let got = det.value(ts);
            let tol = tolerance(name, &hist[hist.len().saturating_sub(2 * n)..]);
            prop_assert!(close(got, want, tol), "{call} step {}: got {got}, want {want}", hist.len());
        }
    }

    #[test]
    fn time_window_aggregates(s in stream(), secs in 1u64..20, which in 0..AGGS.len(), p in 0u32..=100, probe in 0u64..5000) {
        check_time_window(&s, &format!("{secs}s"), secs * 1000, AGGS[which], p, probe)?;
    }

    /// Streams spanning months, with windows of half a day up to the longest allowed (a
    /// day), longer than the gaps: the rings store timestamps as 32-bit offsets (49 days)
    /// from a base, so most of these cross the offset range with live samples on both sides.
    #[test]
    fn time_window_aggregates_over_months(s in long_stream(), hours in 12u64..=24, which in 0..AGGS.len(), p in 0u32..=100, probe in 0u64..3_600_000) {
        check_time_window(&s, &format!("{hours}h"), hours * 3_600_000, AGGS[which], p, probe)?;
    }

    /// One rule with every aggregate over one window, the first of them a count (a ring
    /// without values until the others join): the compiler keeps one ring, and each
    /// aggregate read from it matches the reference.
    #[test]
    fn aggregates_over_one_window_share_its_ring(s in stream(), secs in 1u64..20, p in 0u32..=100) {
        let window = format!("{secs}s");
        let src = format!(
            "rule r\n when count(x, {window}) + avg(x, {window}) + min(x, {window}) + max(x, {window}) + sum(x, {window}) + stddev(x, {window}) + median(x, {window}) + percentile(x, {p}, {window}) > 0\n alert info \"x\""
        );
        let limits = Limits { time_window_samples: CAP, ..Limits::default() };
        let plan = compile_with(&src, &limits).unwrap_or_else(|e| panic!("{e}"));
        let dets = &plan.inner.rules[0].dets;
        prop_assert_eq!(dets.len(), 1);
        prop_assert!(dets[0].window.sorted && dets[0].window.values);
        let mut det = Det::new(&dets[0], 0);
        let horizon = secs * 1000;
        let q = f64::from(p) / 100.0;
        let fns = [
            ("count", AggFn::Count),
            ("avg", AggFn::Avg),
            ("min", AggFn::Min),
            ("max", AggFn::Max),
            ("sum", AggFn::Sum),
            ("stddev", AggFn::Stddev),
            ("median", AggFn::Quantile(0.5)),
            ("percentile", AggFn::Quantile(q)),
        ];
        let mut hist: Vec<(u64, f64)> = Vec::new();
        let mut ts = 0;
        for (dt, x) in s {
            ts += dt;
            det.update(ts, x);
            hist.push((ts, x));
            let w: Vec<f64> = hist[hist.len().saturating_sub(CAP)..]
                .iter()
                .filter(|(t, _)| t + horizon > ts)
                .map(|(_, v)| *v)
                .collect();
            let recent: Vec<f64> = hist[hist.len().saturating_sub(2 * CAP)..].iter().map(|(_, v)| *v).collect();
            for (name, f) in fns {
                let want = agg(name, &w, q);
                let got = det.agg(ts, f);
                prop_assert!(close(got, want, tolerance(name, &recent)), "{name} at {ts}: got {got}, want {want}");
            }
        }
    }

    #[test]
    fn zscore_matches_reference(s in stream(), n in 2usize..40) {
        let mut det = Det::new(&spec(&format!("zscore(x, {n})")), 0);
        let mut hist: Vec<f64> = Vec::new();
        for (i, (_, x)) in s.into_iter().enumerate() {
            det.update(i as u64, x);
            let want = if hist.len() >= n {
                let w = &hist[hist.len() - n..];
                ref_score(x, mean(w), pstddev(w))
            } else {
                f64::NAN
            };
            hist.push(x);
            let got = det.value(i as u64);
            prop_assert!(close(got, want, 1e-6), "step {i}: got {got}, want {want}");
        }
    }

    #[test]
    fn mad_matches_reference(s in stream(), n in 2usize..40) {
        let mut det = Det::new(&spec(&format!("mad_score(x, {n})")), 0);
        let mut hist: Vec<f64> = Vec::new();
        for (i, (_, x)) in s.into_iter().enumerate() {
            det.update(i as u64, x);
            let want = if hist.len() >= n {
                let w = &hist[hist.len() - n..];
                let m = median(w);
                let dev: Vec<f64> = w.iter().map(|v| (v - m).abs()).collect();
                ref_score(x, m, 1.4826 * median(&dev)).abs()
            } else {
                f64::NAN
            };
            hist.push(x);
            let got = det.value(i as u64);
            prop_assert!(close(got, want, 1e-9), "step {i}: got {got}, want {want}");
        }
    }

    #[test]
    fn ewma_and_ewma_dev_match_reference(s in stream(), alpha_pct in 1u32..=100) {
        let alpha = f64::from(alpha_pct) / 100.0;
        let mut dev = Det::new(&spec(&format!("ewma_dev(x, {alpha})")), 0);
        let mut avg = Det::new(&spec(&format!("ewma(x, {alpha})")), 0);
        // Reference: the textbook exponentially weighted mean and variance, written out.
        let (mut m, mut var, mut seen) = (0.0f64, 0.0f64, 0usize);
        let warmup = (1.0 / alpha).ceil() as usize;
        for (i, (_, x)) in s.into_iter().enumerate() {
            dev.update(i as u64, x);
            avg.update(i as u64, x);
            let want_dev = if seen >= warmup { ref_score(x, m, var.sqrt()) } else { f64::NAN };
            if seen == 0 {
                m = x;
            } else {
                let prev = m;
                m = alpha * x + (1.0 - alpha) * prev;
                var = (1.0 - alpha) * (var + alpha * (x - prev) * (x - prev));
            }
            seen += 1;
            prop_assert!(close(dev.value(i as u64), want_dev, 1e-6), "ewma_dev step {i}");
            prop_assert!(close(avg.value(i as u64), m, 1e-9), "ewma step {i}");
        }
    }

    #[test]
    fn rate_flatline_missing_match_reference(s in stream(), secs in 1u64..10, probe in 0u64..20_000) {
        let mut rate = Det::new(&spec("rate(x)"), 0);
        let mut flat = Det::new(&spec(&format!("flatline(x, {secs}s)")), 0);
        let mut miss = Det::new(&spec(&format!("missing(x, {secs}s)")), 0);
        let dur = secs * 1000;
        let mut hist: Vec<(u64, f64)> = Vec::new();
        let mut ts = 0;
        for (dt, x) in s {
            ts += dt;
            rate.update(ts, x);
            flat.update(ts, x);
            miss.update(ts, x);
            let want_rate = match hist.last() {
                Some(&(pt, pv)) if ts > pt => (x - pv) / ((ts - pt) as f64 / 1000.0),
                _ => f64::NAN,
            };
            hist.push((ts, x));
            // Flat run: the longest suffix of equal values.
            let start = hist.iter().rposition(|(_, v)| *v != x).map_or(0, |i| i + 1);
            let want_flat = ts - hist[start].0 >= dur;
            prop_assert!(close(rate.value(ts), want_rate, 1e-9));
            prop_assert_eq!(flat.value(ts) == 1.0, want_flat);
            prop_assert_eq!(miss.value(ts + probe) == 1.0, probe >= dur);
        }
    }
}

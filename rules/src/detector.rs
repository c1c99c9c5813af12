//! Detectors: the per-device state of each window function and anomaly detector a rule
//! calls, created from the plan's [`DetSpec`] and fed one reading at a time.
//!
//! Window aggregates keep a [`Ring`]; z-score and MAD score the newest sample against the
//! window before it (so a spike does not dilute its own score); EWMA, rate, flatline and
//! missing keep a few words. No update allocates.

use crate::plan::{bool_f, AggFn, DetKind, DetSpec};
use crate::window::Ring;

/// One detector's state for one (rule, device), shaped by its [`DetSpec`].
#[derive(Debug, Clone)]
pub(crate) enum Det {
    Agg {
        f: AggFn,
        ring: Ring,
        horizon_ms: u64,
    },
    ZScore {
        ring: Ring,
        out: f64,
    },
    Mad {
        ring: Ring,
        out: f64,
    },
    EwmaDev {
        alpha: f64,
        warmup: u32,
        n: u32,
        mean: f64,
        var: f64,
        out: f64,
    },
    Ewma {
        alpha: f64,
        seen: bool,
        mean: f64,
    },
    Rate {
        prev: Option<(u64, f64)>,
        out: f64,
    },
    Flatline {
        dur_ms: u64,
        tolerance: f64,
        reference: Option<f64>,
        since: u64,
        newest: u64,
    },
    Missing {
        dur_ms: u64,
        newest: u64,
    },
}

/// Below this relative spread a window counts as constant: Welford's downdate leaves
/// rounding noise where the exact standard deviation is zero.
const REL_EPS: f64 = 1e-12;

fn score(x: f64, centre: f64, spread: f64) -> f64 {
    if spread > REL_EPS * centre.abs().max(1.0) {
        (x - centre) / spread
    } else if x == centre {
        0.0
    } else if x > centre {
        f64::INFINITY
    } else {
        f64::NEG_INFINITY
    }
}

impl Det {
    /// Starts loading the buffers [`update`](Det::update) will touch (see [`Ring::prefetch`]).
    pub(crate) fn prefetch(&self) {
        match self {
            Det::Agg { ring, .. } | Det::ZScore { ring, .. } | Det::Mad { ring, .. } => {
                ring.prefetch()
            }
            _ => {}
        }
    }

    pub(crate) fn new(spec: &DetSpec, created_ts: u64) -> Det {
        let w = spec.window;
        match spec.kind {
            DetKind::Agg(f) => Det::Agg {
                f,
                ring: Ring::new(w.cap, w.horizon_ms > 0, w.sorted, w.values),
                horizon_ms: w.horizon_ms,
            },
            DetKind::ZScore => Det::ZScore {
                ring: Ring::new(w.cap, false, false, true),
                out: f64::NAN,
            },
            DetKind::MadScore => Det::Mad {
                ring: Ring::new(w.cap, false, true, true),
                out: f64::NAN,
            },
            DetKind::EwmaDev { alpha } => Det::EwmaDev {
                alpha,
                warmup: (1.0 / alpha).ceil().min(u32::MAX as f64) as u32,
                n: 0,
                mean: 0.0,
                var: 0.0,
                out: f64::NAN,
            },
            DetKind::Ewma { alpha } => Det::Ewma {
                alpha,
                seen: false,
                mean: 0.0,
            },
            DetKind::Rate => Det::Rate {
                prev: None,
                out: f64::NAN,
            },
            DetKind::Flatline { dur_ms, tolerance } => Det::Flatline {
                dur_ms,
                tolerance,
                reference: None,
                since: 0,
                newest: 0,
            },
            DetKind::Missing { dur_ms } => Det::Missing {
                dur_ms,
                newest: created_ts,
            },
        }
    }

    /// Feeds one reading; returns true if a time window dropped a sample early.
    pub(crate) fn update(&mut self, ts: u64, x: f64) -> bool {
        match self {
            Det::Agg {
                ring, horizon_ms, ..
            } => {
                ring.expire(ts, *horizon_ms);
                ring.push(ts, x) && *horizon_ms > 0
            }
            Det::ZScore { ring, out } => {
                *out = if ring.is_full() {
                    score(x, ring.mean(), ring.stddev())
                } else {
                    f64::NAN
                };
                ring.push(ts, x);
                false
            }
            Det::Mad { ring, out } => {
                *out = if ring.is_full() {
                    let (mad, median) = ring.mad();
                    score(x, median, 1.4826 * mad).abs()
                } else {
                    f64::NAN
                };
                ring.push(ts, x);
                false
            }
            Det::EwmaDev {
                alpha,
                warmup,
                n,
                mean,
                var,
                out,
            } => {
                *out = if *n >= *warmup {
                    score(x, *mean, var.max(0.0).sqrt())
                } else {
                    f64::NAN
                };
                if *n == 0 {
                    *mean = x;
                    *var = 0.0;
                } else {
                    let d = x - *mean;
                    let incr = *alpha * d;
                    *mean += incr;
                    *var = (1.0 - *alpha) * (*var + d * incr);
                }
                *n = n.saturating_add(1);
                false
            }
            Det::Ewma { alpha, seen, mean } => {
                if *seen {
                    *mean += *alpha * (x - *mean);
                } else {
                    *mean = x;
                    *seen = true;
                }
                false
            }
            Det::Rate { prev, out } => {
                *out = match *prev {
                    Some((pts, pv)) if ts > pts => (x - pv) * 1000.0 / (ts - pts) as f64,
                    _ => f64::NAN,
                };
                *prev = Some((ts, x));
                false
            }
            Det::Flatline {
                tolerance,
                reference,
                since,
                newest,
                ..
            } => {
                match *reference {
                    Some(r) if (x - r).abs() <= *tolerance => {}
                    _ => {
                        *reference = Some(x);
                        *since = ts;
                    }
                }
                *newest = ts;
                false
            }
            Det::Missing { newest, .. } => {
                *newest = ts;
                false
            }
        }
    }

    /// Aggregate `f` over this detector's window at `now` (aggregates only; the compiler
    /// gave the window what `f` reads).
    pub(crate) fn agg(&mut self, now: u64, f: AggFn) -> f64 {
        let Det::Agg {
            ring, horizon_ms, ..
        } = self
        else {
            return f64::NAN;
        };
        ring.expire(now, *horizon_ms);
        match f {
            AggFn::Avg => ring.mean(),
            AggFn::Min => ring.min(),
            AggFn::Max => ring.max(),
            AggFn::Sum => ring.sum(),
            AggFn::Count => ring.len() as f64,
            AggFn::Stddev => ring.stddev(),
            AggFn::Quantile(q) => ring.quantile(q),
        }
    }

    pub(crate) fn value(&mut self, now: u64) -> f64 {
        match self {
            Det::Agg { f, .. } => {
                let f = *f;
                self.agg(now, f)
            }
            Det::ZScore { out, .. }
            | Det::Mad { out, .. }
            | Det::EwmaDev { out, .. }
            | Det::Rate { out, .. } => *out,
            Det::Ewma { seen, mean, .. } => {
                if *seen {
                    *mean
                } else {
                    f64::NAN
                }
            }
            Det::Flatline {
                dur_ms,
                reference,
                since,
                newest,
                ..
            } => bool_f(reference.is_some() && newest.saturating_sub(*since) >= *dur_ms),
            Det::Missing { dur_ms, newest } => bool_f(now.saturating_sub(*newest) >= *dur_ms),
        }
    }
}

//! Property test: the compiled threshold rule (hysteresis and durations) against a direct
//! reference state machine over random streams, through the public API.

use edgestream_rules::*;
use proptest::prelude::*;

/// Reference: raise when `x > hi` has held for `for_ms` (continuously, by reading time);
/// clear when `x < lo` has held for `clear_ms`.
fn reference(
    stream: &[(u64, f64)],
    hi: f64,
    lo: f64,
    for_ms: u64,
    clear_ms: u64,
) -> Vec<(AlertState, u64)> {
    let mut events = Vec::new();
    let mut raised = false;
    let mut since: Option<u64> = None;
    for &(ts, x) in stream {
        if !raised {
            if x > hi {
                let s = *since.get_or_insert(ts);
                if ts - s >= for_ms {
                    raised = true;
                    since = None;
                    events.push((AlertState::Raised, ts));
                }
            } else {
                since = None;
            }
        } else if x < lo {
            let s = *since.get_or_insert(ts);
            if ts - s >= clear_ms {
                raised = false;
                since = None;
                events.push((AlertState::Cleared, ts));
            }
        } else {
            since = None;
        }
    }
    events
}

proptest! {
    #[test]
    fn threshold_with_hysteresis_and_durations(
        gaps in prop::collection::vec((0u64..4000, 60.0f64..100.0), 1..400),
        for_s in 0u64..20,
        clear_s in 0u64..20,
    ) {
        let for_clause = if for_s > 0 { format!(" for {for_s}s") } else { String::new() };
        let clear_clause = if clear_s > 0 { format!(" for {clear_s}s") } else { String::new() };
        let src = format!(
            "rule overheat\n on device \"boiler-*\"\n when temperature > 80{for_clause}\n clear when temperature < 75{clear_clause}\n alert critical \"hot\""
        );
        let mut engine = Engine::new(compile(&src).unwrap());
        let mut out = Output::default();
        let mut ts = 0;
        let mut stream = Vec::new();
        let mut got = Vec::new();
        for (dt, x) in gaps {
            ts += dt;
            stream.push((ts, x));
            engine.on_reading(&Reading { device: "boiler-9", metric: "temperature", value: x, ts_ms: ts }, &mut out);
            got.extend(out.alerts.iter().map(|a| (a.state, a.ts_ms)));
        }
        prop_assert_eq!(got, reference(&stream, 80.0, 75.0, for_s * 1000, clear_s * 1000));
    }
}

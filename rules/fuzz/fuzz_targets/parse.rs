//! Any text given to the compiler yields a plan or positioned errors, never a panic, a hang
//! or unbounded memory; any plan it accepts runs through the engine without panicking.
#![no_main]

use edgestream_rules::{compile, replay, OwnedReading};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(src) = std::str::from_utf8(data) else { return };
    match compile(src) {
        Err(errors) => {
            assert!(!errors.0.is_empty(), "an error result carries at least one error");
            for e in &errors.0 {
                assert!(e.line >= 1 && e.column >= 1, "positions are 1-based: {e}");
                assert!(!e.message.is_empty());
            }
        }
        Ok(plan) => {
            // Exercise the engine with a few readings over names the rule text may mention.
            let mut readings = Vec::new();
            let words: Vec<&str> = src.split(|c: char| !c.is_alphanumeric() && c != '_' && c != '-').filter(|w| !w.is_empty()).take(8).collect();
            for (i, w) in words.iter().enumerate() {
                for (j, m) in words.iter().enumerate() {
                    readings.push(OwnedReading {
                        device: (*w).to_string(),
                        metric: (*m).to_string(),
                        value: (i * 7 + j) as f64 * 13.5 - 40.0,
                        ts_ms: (i * 8 + j) as u64 * 700,
                    });
                }
            }
            let _events = replay(plan, readings);
        }
    }
});

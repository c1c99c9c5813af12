//! Text lines from arbitrary bytes, through the line accumulator and every
//! line parser. A line the accumulator yields is never longer than its
//! buffer, and results do not depend on chunking.
#![no_main]

use edgestream_protocol::text::{parse_json_line, parse_kv_line, CsvMap, LineAccumulator, LineFeed};
use libfuzzer_sys::fuzz_target;

fn run(data: &[u8], chunk: usize, csv: &CsvMap) -> Vec<String> {
    let mut acc = LineAccumulator::<64>::new();
    let mut out = Vec::new();
    for piece in data.chunks(chunk.max(1)) {
        let mut input = piece;
        loop {
            match acc.feed(input) {
                LineFeed::Consumed => break,
                LineFeed::Line { line, remaining } => {
                    assert!(line.len() <= 64);
                    let kv = parse_kv_line(line);
                    let js = parse_json_line(line);
                    let cs = csv.parse(line);
                    for rec in [&kv, &js, &cs].into_iter().flatten() {
                        assert!(!rec.values.is_empty());
                        assert!(rec.values.iter().all(|(_, v)| v.is_finite()));
                    }
                    out.push(format!("{line:?} {kv:?} {js:?} {cs:?}"));
                    input = remaining;
                }
                LineFeed::Error { error, remaining } => {
                    out.push(format!("{error:?}"));
                    input = remaining;
                }
            }
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    let csv = CsvMap::new(["ts", "temperature", "_", "device", "humidity"], ',').unwrap();
    let whole = run(rest, rest.len(), &csv);
    let chunked = run(rest, usize::from(first % 13) + 1, &csv);
    assert_eq!(whole, chunked, "results depend on chunking");
    // The parsers alone, on the raw input as one line.
    if let Ok(line) = std::str::from_utf8(rest) {
        let _ = parse_kv_line(line);
        let _ = parse_json_line(line);
        let _ = csv.parse(line);
    }
});

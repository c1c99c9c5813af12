//! A long, hostile serial stream: valid frames mixed with garbage, truncated
//! frames, corrupted frames and over-long runs, cut into random chunks of 1
//! byte to 4 KiB. Every valid frame that the damage did not reach must come
//! out, in order, and every damaged frame must be reported exactly once.

mod common;

use common::*;
use edgestream_protocol::frame::{encode_frame, FeedResult, FrameAccumulator, FrameError};
use edgestream_protocol::limits::MAX_ENCODED_FRAME_LEN;
use edgestream_protocol::types::DeviceMessage;
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, TestRunner};

/// xorshift64*: deterministic, dependency-free randomness for the stream.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[derive(Default, Debug)]
struct ErrorCounts {
    too_long: usize,
    bad_crc: usize,
    other: usize,
}

fn run_stream(seed: u64, items: usize) {
    let mut rng = Rng(seed | 1);
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        proptest::test_runner::TestRng::from_seed(proptest::test_runner::RngAlgorithm::ChaCha, &{
            let mut s = [0u8; 32];
            s[..8].copy_from_slice(&seed.to_le_bytes());
            s
        }),
    );
    let strategy = device_message();

    let mut wire: Vec<u8> = Vec::new();
    let mut expected: Vec<DeviceMessage> = Vec::new();
    let mut buf = [0u8; MAX_ENCODED_FRAME_LEN + 1];

    for _ in 0..items {
        let msg = strategy.new_tree(&mut runner).unwrap().current();
        let frame = encode_frame(&msg, &mut buf).unwrap().to_vec();
        // A frame is intact only if the previous item ended with a delimiter.
        let clean_start = wire.last().is_none_or(|&b| b == 0);
        match rng.below(10) {
            0..=4 => {
                if clean_start {
                    expected.push(msg);
                }
                wire.extend_from_slice(&frame);
            }
            5 => {
                // Garbage, possibly containing delimiters, possibly not
                // ending with one (then it damages the next frame).
                let n = 1 + rng.below(64);
                wire.extend((0..n).map(|_| rng.next() as u8));
            }
            6 => {
                // Bytes lost in the middle of a frame; its delimiter arrives.
                let body = &frame[..frame.len() - 1];
                let cut = 1 + rng.below(body.len() - 1);
                let keep = rng.below(cut);
                wire.extend_from_slice(&body[..keep]);
                wire.extend_from_slice(&body[cut..]);
                wire.push(0);
            }
            7 => {
                // One byte flipped in transit.
                let mut f = frame.clone();
                let at = rng.below(f.len() - 1);
                let mask = 1u8 << rng.below(8);
                f[at] ^= mask;
                wire.extend_from_slice(&f);
            }
            8 => {
                // A run longer than any frame (e.g. a device printing text).
                let n = MAX_ENCODED_FRAME_LEN + 1 + rng.below(3000);
                wire.extend((0..n).map(|_| 1 + (rng.next() % 255) as u8));
                wire.push(0);
            }
            _ => {
                // Empty frames (flush markers) are not errors.
                wire.extend_from_slice(&[0, 0]);
            }
        }
    }
    // Make sure nothing is left pending at the end.
    wire.push(0);

    // Segment model: each non-empty run between delimiters yields exactly one
    // result, so results = non-empty segments.
    let segments = wire.split(|&b| b == 0).filter(|s| !s.is_empty()).count();

    let mut acc = FrameAccumulator::<MAX_ENCODED_FRAME_LEN>::new();
    let mut got = Vec::new();
    let mut counts = ErrorCounts::default();
    let mut pos = 0;
    while pos < wire.len() {
        let n = (1 + rng.below(4096)).min(wire.len() - pos);
        let mut input = &wire[pos..pos + n];
        pos += n;
        loop {
            match acc.feed(input) {
                FeedResult::Consumed => break,
                FeedResult::Frame { message, remaining } => {
                    got.push(message);
                    input = remaining;
                }
                FeedResult::Error { error, remaining } => {
                    match error {
                        FrameError::TooLong => counts.too_long += 1,
                        FrameError::BadCrc { .. } => counts.bad_crc += 1,
                        _ => counts.other += 1,
                    }
                    input = remaining;
                }
            }
        }
    }

    assert_eq!(
        got.len(),
        expected.len(),
        "seed {seed}: recovered frame count"
    );
    assert!(
        got == expected,
        "seed {seed}: recovered frames differ from the untouched ones"
    );
    let errors = counts.too_long + counts.bad_crc + counts.other;
    assert_eq!(
        got.len() + errors,
        segments,
        "seed {seed}: one result per frame ({counts:?})"
    );
    assert!(
        counts.too_long > 0 && counts.bad_crc > 0 && counts.other > 0,
        "{counts:?}"
    );
    assert_eq!(acc.pending(), 0);
}

#[test]
fn recovers_every_untouched_frame_from_a_hostile_stream() {
    for seed in [1, 2, 3, 0xdead_beef, 0x1234_5678_9abc] {
        run_stream(seed, 3000);
    }
}

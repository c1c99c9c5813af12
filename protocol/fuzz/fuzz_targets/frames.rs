//! Binary frames from arbitrary bytes.
//!
//! Beyond "no panic": the accumulator must give the same results however the
//! input is chunked, and every frame it accepts must re-encode to a frame
//! that decodes to the same message.
#![no_main]

use edgestream_protocol::frame::{encode_frame, FeedResult, FrameAccumulator, FrameError};
use edgestream_protocol::limits::MAX_ENCODED_FRAME_LEN;
use edgestream_protocol::types::DeviceMessage;
use libfuzzer_sys::fuzz_target;

type Results = Vec<Result<DeviceMessage, FrameError>>;

fn run(data: &[u8], chunk: usize) -> Results {
    let mut acc = FrameAccumulator::<MAX_ENCODED_FRAME_LEN>::new();
    let mut out = Vec::new();
    for piece in data.chunks(chunk.max(1)) {
        let mut input = piece;
        loop {
            match acc.feed(input) {
                FeedResult::Consumed => break,
                FeedResult::Frame { message, remaining } => {
                    out.push(Ok(message));
                    input = remaining;
                }
                FeedResult::Error { error, remaining } => {
                    out.push(Err(error));
                    input = remaining;
                }
            }
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else { return };
    let whole = run(rest, rest.len());
    let chunked = run(rest, usize::from(first % 17) + 1);
    assert_eq!(whole, chunked, "results depend on chunking");
    let mut buf = [0u8; MAX_ENCODED_FRAME_LEN + 1];
    for msg in whole.into_iter().flatten() {
        let frame = encode_frame(&msg, &mut buf).expect("an accepted message must re-encode");
        assert_eq!(run(frame, frame.len()), vec![Ok(msg)]);
    }
});

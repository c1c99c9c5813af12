//! Modbus RTU on a serial line: what tokio-modbus's RTU client leaves to its caller.
//!
//! **The inter-frame silence.** An RTU frame ends where the line has been silent for 3.5
//! character times (the "Modbus over serial line" spec, 2.5.1.1): a slave that hears a new
//! request less than that after the previous frame takes both for one and answers neither.
//! tokio-modbus 0.17 writes each request as soon as it is called (its issue #180), so polling
//! several slaves back to back breaks frames on a real bus. [`SilentLine`] wraps the serial
//! stream and holds the first byte of every request until the line has been quiet for
//! [`LineTiming::silence`] since the last byte heard or sent; the bytes of one frame are
//! never held apart. Bytes sent are counted busy until the UART has shifted them out at the
//! line's speed. Above 19,200 baud the spec's fixed 1.75 ms is used.
//!
//! **Late answers.** An answer that arrives after its request timed out would be read as the
//! next request's answer; [`SilentLine`] reads and drops whatever is arriving before it sends
//! a request, and counts the silence from it.
//!
//! **CRC errors.** On a CRC mismatch tokio-modbus drops the answer byte by byte looking for a
//! frame, so a corrupted answer ends as a timeout (or "too many retries"). [`SilentLine`]
//! keeps the bytes heard since the last request ([`LineWatch::answer`], at most one frame),
//! so the poller can tell a damaged answer ([`damaged_frame`]) from silence.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Longest RTU frame (the spec's 256 bytes).
pub const MAX_RTU_FRAME: usize = 256;

/// Character time and the silence between frames on one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineTiming {
    /// Time to send one character (start bit, data bits, parity bit, stop bits).
    pub character: Duration,
    /// The silence that ends a frame: 3.5 characters, 1.75 ms above 19,200 baud.
    pub silence: Duration,
}

impl LineTiming {
    pub fn new(baud_rate: u32, data_bits: u8, parity: bool, stop_bits: u8) -> Self {
        let bits = 1 + u64::from(data_bits) + u64::from(parity) + u64::from(stop_bits);
        let character = Duration::from_nanos(bits * 1_000_000_000 / u64::from(baud_rate.max(1)));
        let silence = if baud_rate > 19_200 {
            Duration::from_micros(1_750)
        } else {
            character * 7 / 2
        };
        Self { character, silence }
    }
}

/// What [`SilentLine`] saw, shared with the poller.
#[derive(Debug, Default)]
pub struct LineWatch {
    /// When the line was last busy: the last byte heard, or the end of the last byte sent.
    pub busy_until: Option<Instant>,
    /// The bytes heard since the last request started (at most [`MAX_RTU_FRAME`]).
    pub answer: Vec<u8>,
}

/// A serial stream that keeps the RTU inter-frame silence (module doc).
#[derive(Debug)]
pub struct SilentLine<T> {
    inner: T,
    timing: LineTiming,
    watch: Arc<Mutex<LineWatch>>,
    /// Bytes of the current frame have been written and it has not been flushed yet.
    in_frame: bool,
    wait: Option<Pin<Box<Sleep>>>,
}

impl<T> SilentLine<T> {
    pub fn new(inner: T, timing: LineTiming, watch: Arc<Mutex<LineWatch>>) -> Self {
        Self {
            inner,
            timing,
            watch,
            in_frame: false,
            wait: None,
        }
    }
}

fn lock(watch: &Mutex<LineWatch>) -> std::sync::MutexGuard<'_, LineWatch> {
    watch.lock().unwrap_or_else(|e| e.into_inner())
}

impl<T: AsyncRead + Unpin> AsyncRead for SilentLine<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let heard = &buf.filled()[before..];
        if !heard.is_empty() {
            let mut w = lock(&self.watch);
            let now = Instant::now();
            w.busy_until = Some(w.busy_until.map_or(now, |b| b.max(now)));
            let room = MAX_RTU_FRAME.saturating_sub(w.answer.len());
            w.answer.extend_from_slice(&heard[..heard.len().min(room)]);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for SilentLine<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if !self.in_frame {
            // Bytes still arriving now belong to an earlier exchange (an answer that came
            // after its timeout): read and drop them, or they would be taken for the next
            // answer; the silence counts from the last of them. An error or the end of the
            // stream is left for the next read to report.
            let mut late = 0;
            loop {
                let mut scratch = [0u8; 64];
                let mut stale = ReadBuf::new(&mut scratch);
                match Pin::new(&mut self.inner).poll_read(cx, &mut stale) {
                    Poll::Ready(Ok(())) if !stale.filled().is_empty() => {
                        late += stale.filled().len();
                    }
                    _ => break,
                }
            }
            if late > 0 {
                tracing::debug!(
                    bytes = late,
                    "late bytes on the line dropped before a request"
                );
                let mut w = lock(&self.watch);
                let now = Instant::now();
                w.busy_until = Some(w.busy_until.map_or(now, |b| b.max(now)));
            }
            // The first byte of a frame: wait for the silence that ends the previous one.
            let quiet_at = lock(&self.watch)
                .busy_until
                .map(|b| b + self.timing.silence);
            if let Some(at) = quiet_at.filter(|at| *at > Instant::now()) {
                let wait = self
                    .wait
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
                wait.as_mut().reset(at);
                ready!(wait.as_mut().poll(cx));
            }
            self.in_frame = true;
            lock(&self.watch).answer.clear();
        }
        let n = ready!(Pin::new(&mut self.inner).poll_write(cx, buf))?;
        let mut w = lock(&self.watch);
        let now = Instant::now();
        // The bytes leave the UART after those still queued before them.
        let start = w.busy_until.map_or(now, |b| b.max(now));
        w.busy_until = Some(start + self.timing.character * n as u32);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        self.in_frame = false;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// CRC-16/MODBUS (polynomial 0xA001 reflected, initial 0xFFFF), sent low byte first.
pub fn crc16(bytes: &[u8]) -> u16 {
    let mut crc = 0xffffu16;
    for b in bytes {
        crc ^= u16::from(*b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xa001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

/// Whether `answer` holds a whole answer frame (its length told by its function code and byte
/// count) whose CRC does not match.
pub fn damaged_frame(answer: &[u8]) -> bool {
    let Some(&function) = answer.get(1) else {
        return false;
    };
    let len = match function {
        f if f & 0x80 != 0 => 5,
        1..=4 => match answer.get(2) {
            Some(n) => 5 + usize::from(*n),
            None => return false,
        },
        5 | 6 | 15 | 16 => 8,
        _ => return false,
    };
    if answer.len() < len {
        return false;
    }
    let sent = u16::from_le_bytes([answer[len - 2], answer[len - 1]]);
    crc16(&answer[..len - 2]) != sent
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn frame(body: &[u8]) -> Vec<u8> {
        let mut f = body.to_vec();
        f.extend_from_slice(&crc16(body).to_le_bytes());
        f
    }

    #[test]
    fn timing_of_common_lines() {
        // 9600 8E1: 11 bits a character, 1.146 ms; 3.5 of them 4.01 ms.
        let t = LineTiming::new(9_600, 8, true, 1);
        assert_eq!(t.character, Duration::from_nanos(1_145_833));
        assert_eq!(t.silence, Duration::from_nanos(4_010_415));
        // Above 19,200 baud: the spec's fixed 1.75 ms.
        assert_eq!(
            LineTiming::new(115_200, 8, false, 1).silence,
            Duration::from_micros(1_750)
        );
    }

    #[test]
    fn crc_and_damaged_frames() {
        // The spec's example: read 1 holding register of slave 1 at 0 -> CRC 0x0A84.
        assert_eq!(crc16(&[0x01, 0x03, 0x00, 0x00, 0x00, 0x01]), 0x0a84);
        let good = frame(&[0x01, 0x03, 0x02, 0x12, 0x34]);
        assert!(!damaged_frame(&good));
        let mut bad = good.clone();
        bad[3] ^= 0x10;
        assert!(damaged_frame(&bad));
        assert!(!damaged_frame(&bad[..5]), "not whole yet");
        assert!(damaged_frame(&[0x01, 0x83, 0x02, 0x00, 0x00]));
        assert!(!damaged_frame(&frame(&[0x01, 0x83, 0x02])));
        assert!(!damaged_frame(&[]));
    }

    proptest::proptest! {
        /// Any bytes (what a noisy line delivers): no panic; a whole frame with its CRC is
        /// never called damaged, and one flipped bit in it always is.
        #[test]
        fn damaged_frame_on_any_input(
            noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            unit in 1u8..=247,
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..=250),
            flip in proptest::prelude::any::<usize>(),
        ) {
            let _ = damaged_frame(&noise);
            let mut body = vec![unit, 0x03, data.len() as u8];
            body.extend_from_slice(&data);
            let good = frame(&body);
            proptest::prop_assert!(!damaged_frame(&good));
            let mut bad = good.clone();
            let bit = flip % (bad.len() * 8);
            // Not the byte count: a changed length describes another (incomplete) frame.
            proptest::prop_assume!(bit / 8 != 2 && bit / 8 != 1);
            bad[bit / 8] ^= 1 << (bit % 8);
            proptest::prop_assert!(damaged_frame(&bad));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_waits_for_the_silence_and_a_late_answer_is_dropped() {
        let (agent, mut slave) = tokio::io::duplex(1024);
        let timing = LineTiming::new(9_600, 8, true, 1);
        let watch = Arc::new(Mutex::new(LineWatch::default()));
        let mut line = SilentLine::new(agent, timing, watch.clone());
        let request = frame(&[0x01, 0x03, 0x00, 0x00, 0x00, 0x01]);

        // The first request goes at once: nothing was heard yet.
        let t0 = Instant::now();
        line.write_all(&request).await.unwrap();
        line.flush().await.unwrap();
        assert_eq!(Instant::now(), t0);
        let mut got = [0u8; 8];
        slave.read_exact(&mut got).await.unwrap();

        // The answer, 20 ms later.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let answer = frame(&[0x01, 0x03, 0x02, 0x12, 0x34]);
        slave.write_all(&answer).await.unwrap();
        let mut heard = [0u8; 7];
        line.read_exact(&mut heard).await.unwrap();
        let answered = Instant::now();
        assert_eq!(lock(&watch).answer, answer);

        // The next request waits 3.5 characters after the last byte heard.
        line.write_all(&request).await.unwrap();
        line.flush().await.unwrap();
        let waited = Instant::now() - answered;
        assert!(
            waited >= timing.silence && waited < timing.silence + Duration::from_millis(2),
            "{waited:?}"
        );
        assert!(
            lock(&watch).answer.is_empty(),
            "a new request starts a new answer"
        );

        // No answer: the next request waits for its 8 bytes to leave the UART, then the
        // silence.
        let sent = Instant::now();
        line.write_all(&request).await.unwrap();
        line.flush().await.unwrap();
        let waited = Instant::now() - sent;
        let want = timing.character * 8 + timing.silence;
        assert!(
            waited >= want && waited < want + Duration::from_millis(2),
            "{waited:?} against {want:?}"
        );

        // An answer that comes late, after its request timed out: it is dropped before the
        // next request, and the silence counts from it.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut got = [0u8; 16];
        slave.read_exact(&mut got).await.unwrap(); // the two requests not answered
        let late = frame(&[0x01, 0x03, 0x02, 0xde, 0xad]);
        slave.write_all(&late).await.unwrap();
        let heard_late = Instant::now();
        line.write_all(&request).await.unwrap();
        line.flush().await.unwrap();
        assert!(Instant::now() - heard_late >= timing.silence);
        let mut got = [0u8; 8];
        slave.read_exact(&mut got).await.unwrap();
        let fresh = frame(&[0x01, 0x03, 0x02, 0x00, 0x07]);
        slave.write_all(&fresh).await.unwrap();
        let mut heard = [0u8; 7];
        line.read_exact(&mut heard).await.unwrap();
        assert_eq!(heard.to_vec(), fresh, "the late answer was dropped");
    }
}

//! The outbox's files: segment files of CRC-framed records, and the acknowledgement file.
//!
//! **Segment file** `{h|l}-{id:016x}.seg` (one priority per file; ids increase for the life of
//! the store). A 26-byte header, `[magic "ESOL"][version 1][priority][first seq: u64 LE][base
//! time: u64 LE unix secs][crc32 of the 22 bytes before it: u32 LE]`, then frames:
//! `[crc32 of the rest of the frame: u32 LE][body length: varint][seq - first seq: varint]
//! [zigzag(append time - base time): varint][body: postcard]`. Every frame stands alone given
//! its segment's header, so a damaged frame followed by an intact one is skipped without
//! losing its neighbours, and a torn tail (a frame cut short, or the zeros a file system can
//! leave past the last synced write) ends the valid part of the file: opening truncates it
//! there.
//!
//! **Acknowledgement file** `acks`: two slots of [`ACK_SLOT`] bytes, written alternately, each
//! `[magic "ESAK"][generation: u64][next seq: u64][closed: u8]` then per priority (high, low) `[head
//! segment id: u64][head offset: u64][n: u32][n removed seqs: u64]`, then the crc32 of all that
//! (all little-endian). The head is the first record not yet acknowledged; the removed seqs are
//! records after it acknowledged out of order. A slot torn by a power cut fails its CRC and the
//! other (older) one is used: an older head resends a few acknowledged records, never loses one.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::outbox::record::Priority;

pub const SEGMENT_MAGIC: [u8; 4] = *b"ESOL";
pub const LOG_VERSION: u8 = 1;
pub const SEGMENT_HEADER_LEN: u64 = 26;
/// A frame longer than this is taken for damage, not a record.
pub const MAX_FRAME: usize = 16 << 20;
pub const ACK_MAGIC: [u8; 4] = *b"ESAK";
pub const ACK_SLOT: usize = 4096;
pub const ACK_FILE: &str = "acks";
/// Removed seqs a slot holds per priority; more than that (out-of-order acknowledgements
/// beyond the uplink's window) are resent after a restart.
pub const ACK_MAX_REMOVED: usize = (ACK_SLOT - 4 - 8 - 8 - 1 - 4 - 2 * (8 + 8 + 4)) / 16;
/// Bytes read from a segment at a time.
const READ_CHUNK: usize = 64 * 1024;

pub fn prio_char(p: Priority) -> char {
    match p {
        Priority::High => 'h',
        Priority::Low => 'l',
    }
}

pub fn segment_name(p: Priority, id: u64) -> String {
    format!("{}-{id:016x}.seg", prio_char(p))
}

/// The priority and id of a segment file's name, if it is one.
pub fn parse_segment_name(name: &str) -> Option<(Priority, u64)> {
    let rest = name.strip_suffix(".seg")?;
    let (p, id) = rest.split_once('-')?;
    let p = match p {
        "h" => Priority::High,
        "l" => Priority::Low,
        _ => return None,
    };
    if id.len() != 16 {
        return None;
    }
    Some((p, u64::from_str_radix(id, 16).ok()?))
}

/// A segment's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub priority: Priority,
    pub first_seq: u64,
    pub base_time: u64,
}

impl SegmentHeader {
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN as usize] {
        let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
        h[..4].copy_from_slice(&SEGMENT_MAGIC);
        h[4] = LOG_VERSION;
        h[5] = self.priority as u8;
        h[6..14].copy_from_slice(&self.first_seq.to_le_bytes());
        h[14..22].copy_from_slice(&self.base_time.to_le_bytes());
        let crc = crc32fast::hash(&h[..22]);
        h[22..].copy_from_slice(&crc.to_le_bytes());
        h
    }

    pub fn decode(h: &[u8]) -> Option<SegmentHeader> {
        if h.len() < SEGMENT_HEADER_LEN as usize || h[..4] != SEGMENT_MAGIC || h[4] != LOG_VERSION {
            return None;
        }
        let crc = u32::from_le_bytes(h[22..26].try_into().ok()?);
        if crc != crc32fast::hash(&h[..22]) {
            return None;
        }
        let priority = match h[5] {
            0 => Priority::High,
            1 => Priority::Low,
            _ => return None,
        };
        Some(SegmentHeader {
            priority,
            first_seq: u64::from_le_bytes(h[6..14].try_into().ok()?),
            base_time: u64::from_le_bytes(h[14..22].try_into().ok()?),
        })
    }
}

/// Appends one frame to `out`.
pub fn put_frame(out: &mut Vec<u8>, h: &SegmentHeader, seq: u64, time: u64, body: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    put_varint(out, body.len() as u64);
    put_varint(out, seq.saturating_sub(h.first_seq));
    put_varint(out, zigzag(time as i64 - h.base_time as i64));
    out.extend_from_slice(body);
    let crc = crc32fast::hash(&out[start + 4..]);
    out[start..start + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Bytes a frame of a `body_len`-byte body takes, at most.
pub fn max_frame_len(body_len: usize) -> usize {
    4 + 10 + 10 + 10 + body_len
}

/// What the bytes at some position hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    Frame {
        seq: u64,
        time: u64,
        /// Relative to the parsed slice.
        body: Range<usize>,
        len: usize,
    },
    /// The slice ends before the frame does; `Some(n)`: the frame is `n` bytes.
    Short(Option<usize>),
    /// Not a valid frame; `Some(n)`: it claims to be `n` bytes.
    Bad(Option<usize>),
}

pub fn parse_frame(b: &[u8], h: &SegmentHeader) -> Parsed {
    if b.len() < 4 {
        return Parsed::Short(None);
    }
    let mut at = 4;
    let mut field = || match get_varint(b, &mut at) {
        Varint::Value(v) => Ok(v),
        Varint::Short => Err(Parsed::Short(None)),
        Varint::Bad => Err(Parsed::Bad(None)),
    };
    let (len, dseq, dtime) = match (field(), field(), field()) {
        (Ok(a), Ok(b), Ok(c)) => (a, b, c),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return e,
    };
    if len == 0 || len > MAX_FRAME as u64 {
        return Parsed::Bad(None);
    }
    let end = at + len as usize;
    if b.len() < end {
        return Parsed::Short(Some(end));
    }
    let stored = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    if stored != crc32fast::hash(&b[4..end]) {
        return Parsed::Bad(Some(end));
    }
    let (Some(seq), Some(time)) = (
        h.first_seq.checked_add(dseq),
        (h.base_time as i64).checked_add(unzigzag(dtime)),
    ) else {
        return Parsed::Bad(Some(end));
    };
    Parsed::Frame {
        seq,
        time: time.max(0) as u64,
        body: at..end,
        len: end,
    }
}

/// One step of a [`Scanner`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A valid record at `off`, `len` bytes; its body is [`Scanner::body`] until the next step.
    Frame {
        off: u64,
        len: u64,
        seq: u64,
        time: u64,
    },
    /// A damaged frame at `off` followed by a valid one: skipped.
    Corrupt {
        off: u64,
        len: u64,
    },
    /// Nothing valid from `off` to the end: a torn tail (or damage that hides where the next
    /// frame starts).
    Torn {
        off: u64,
    },
    End,
}

/// Reads the frames of one segment in order, [`READ_CHUNK`] bytes at a time.
#[derive(Debug)]
pub struct Scanner<'a> {
    file: &'a File,
    header: SegmentHeader,
    end: u64,
    buf: Vec<u8>,
    buf_off: u64,
    pos: usize,
    body: Range<usize>,
    /// Bytes the next read asks for: small at first (a peek at the head needs one frame),
    /// doubling up to [`READ_CHUNK`] as the scan goes on.
    chunk: usize,
}

impl<'a> Scanner<'a> {
    /// Frames from offset `from` (a frame boundary) up to `end` (the file's valid length).
    pub fn new(file: &'a File, header: SegmentHeader, from: u64, end: u64) -> Self {
        Scanner {
            file,
            header,
            end,
            buf: Vec::new(),
            buf_off: from,
            pos: 0,
            body: 0..0,
            chunk: 4096,
        }
    }

    /// The current file offset (where the next step starts).
    pub fn offset(&self) -> u64 {
        self.buf_off + self.pos as u64
    }

    /// The body of the last [`Item::Frame`].
    pub fn body(&self) -> &[u8] {
        &self.buf[self.body.clone()]
    }

    /// Makes at least `want` bytes from `pos` available, or all up to `end`.
    fn fill(&mut self, want: usize) -> io::Result<()> {
        let have = self.buf.len() - self.pos;
        let left = self.end.saturating_sub(self.offset()) as usize;
        let want = want.min(left);
        if have >= want {
            return Ok(());
        }
        self.buf.drain(..self.pos);
        self.buf_off += self.pos as u64;
        self.pos = 0;
        let target = want.max(self.chunk).min(left);
        self.chunk = (self.chunk * 2).min(READ_CHUNK);
        let mut at = self.buf.len();
        self.buf.resize(target, 0);
        while at < target {
            let n = self
                .file
                .read_at(&mut self.buf[at..], self.buf_off + at as u64)?;
            if n == 0 {
                break;
            }
            at += n;
        }
        self.buf.truncate(at);
        Ok(())
    }

    pub fn next_item(&mut self) -> io::Result<Item> {
        let off = self.offset();
        if off >= self.end {
            return Ok(Item::End);
        }
        self.fill(64)?;
        let mut parsed = parse_frame(&self.buf[self.pos..], &self.header);
        if let Parsed::Short(Some(n)) = parsed {
            self.fill(n)?;
            parsed = parse_frame(&self.buf[self.pos..], &self.header);
        }
        match parsed {
            Parsed::Frame {
                seq,
                time,
                body,
                len,
            } => {
                self.body = self.pos + body.start..self.pos + body.end;
                self.pos += len;
                Ok(Item::Frame {
                    off,
                    len: len as u64,
                    seq,
                    time,
                })
            }
            Parsed::Bad(Some(n)) if off + (n as u64) < self.end => {
                // Damage, not a tear, if a valid frame follows.
                self.fill(n + 64)?;
                let mut next = parse_frame(&self.buf[self.pos + n..], &self.header);
                if let Parsed::Short(Some(m)) = next {
                    self.fill(n + m)?;
                    next = parse_frame(&self.buf[self.pos + n..], &self.header);
                }
                if matches!(next, Parsed::Frame { .. }) {
                    self.pos += n;
                    Ok(Item::Corrupt { off, len: n as u64 })
                } else {
                    Ok(Item::Torn { off })
                }
            }
            Parsed::Short(_) | Parsed::Bad(_) => Ok(Item::Torn { off }),
        }
    }
}

/// The acknowledged position of one priority.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AckPos {
    /// Segment id and offset of the first record not acknowledged (offset 0: the segment's
    /// first record).
    pub head_seg: u64,
    pub head_off: u64,
    /// Records after the head acknowledged out of order.
    pub removed: Vec<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AckState {
    pub generation: u64,
    pub next_seq: u64,
    /// Written by the store's last commit when it is closed; any other slot says `false`, so
    /// an open that finds `false` knows the previous holder stopped without closing it.
    pub closed: bool,
    /// Indexed by `Priority as usize`.
    pub pos: [AckPos; 2],
}

impl AckState {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(ACK_SLOT);
        b.extend_from_slice(&ACK_MAGIC);
        b.extend_from_slice(&self.generation.to_le_bytes());
        b.extend_from_slice(&self.next_seq.to_le_bytes());
        b.push(u8::from(self.closed));
        for p in &self.pos {
            b.extend_from_slice(&p.head_seg.to_le_bytes());
            b.extend_from_slice(&p.head_off.to_le_bytes());
            let n = p.removed.len().min(ACK_MAX_REMOVED);
            b.extend_from_slice(&(n as u32).to_le_bytes());
            for s in &p.removed[..n] {
                b.extend_from_slice(&s.to_le_bytes());
            }
        }
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b.resize(ACK_SLOT, 0);
        b
    }

    pub fn decode(b: &[u8]) -> Option<AckState> {
        let mut at = 0;
        let mut take = |n: usize| -> Option<&[u8]> {
            let s = b.get(at..at + n)?;
            at += n;
            Some(s)
        };
        let u64_of = |s: &[u8]| u64::from_le_bytes(s.try_into().unwrap_or([0; 8]));
        if take(4)? != ACK_MAGIC {
            return None;
        }
        let generation = u64_of(take(8)?);
        let next_seq = u64_of(take(8)?);
        let closed = match take(1)? {
            [0] => false,
            [1] => true,
            _ => return None,
        };
        let mut pos: [AckPos; 2] = Default::default();
        for p in &mut pos {
            p.head_seg = u64_of(take(8)?);
            p.head_off = u64_of(take(8)?);
            let n = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
            if n > ACK_MAX_REMOVED {
                return None;
            }
            for _ in 0..n {
                p.removed.push(u64_of(take(8)?));
            }
        }
        let end = at;
        let crc = u32::from_le_bytes(b.get(end..end + 4)?.try_into().ok()?);
        (crc == crc32fast::hash(&b[..end])).then_some(AckState {
            generation,
            next_seq,
            closed,
            pos,
        })
    }

    /// The newest intact slot of an acknowledgement file's bytes.
    pub fn read(bytes: &[u8]) -> Option<AckState> {
        bytes
            .chunks(ACK_SLOT)
            .take(2)
            .filter_map(AckState::decode)
            .max_by_key(|s| s.generation)
    }

    /// Writes this state into its slot (by generation) and syncs it.
    pub fn write(&self, file: &File) -> io::Result<()> {
        let slot = (self.generation % 2) * ACK_SLOT as u64;
        file.write_all_at(&self.encode(), slot)?;
        file.sync_data()
    }
}

/// fsync of a directory, so that files created, renamed or deleted in it stay so.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The segment files in `dir` per priority (indexed by `Priority as usize`), by id.
pub fn list_segments(dir: &Path) -> io::Result<[Vec<(u64, PathBuf)>; 2]> {
    let mut out: [Vec<(u64, PathBuf)>; 2] = Default::default();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if let Some((p, id)) = e.file_name().to_str().and_then(parse_segment_name) {
            out[p as usize].push((id, e.path()));
        }
    }
    for v in &mut out {
        v.sort_unstable_by_key(|(id, _)| *id);
    }
    Ok(out)
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

enum Varint {
    Value(u64),
    Short,
    Bad,
}

fn get_varint(b: &[u8], at: &mut usize) -> Varint {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let Some(&byte) = b.get(*at) else {
            return Varint::Short;
        };
        *at += 1;
        match u64::from(byte & 0x7F).checked_shl(shift) {
            Some(x) => v |= x,
            None => return Varint::Bad,
        }
        if byte & 0x80 == 0 {
            return Varint::Value(v);
        }
    }
    Varint::Bad
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> SegmentHeader {
        SegmentHeader {
            priority: Priority::Low,
            first_seq: 1000,
            base_time: 1_700_000_000,
        }
    }

    #[test]
    fn frames_round_trip_and_every_flipped_bit_or_cut_is_detected() {
        let h = header();
        let mut b = Vec::new();
        put_frame(&mut b, &h, 1042, 1_699_999_990, b"hello world");
        match parse_frame(&b, &h) {
            Parsed::Frame {
                seq,
                time,
                body,
                len,
            } => {
                assert_eq!(
                    (seq, time, &b[body], len),
                    (1042, 1_699_999_990, &b"hello world"[..], b.len())
                );
            }
            other => panic!("{other:?}"),
        }
        for i in 0..b.len() * 8 {
            let mut c = b.clone();
            c[i / 8] ^= 1 << (i % 8);
            assert!(
                !matches!(parse_frame(&c, &h), Parsed::Frame { .. }),
                "flip of bit {i} went unnoticed"
            );
        }
        for n in 0..b.len() {
            assert!(
                matches!(parse_frame(&b[..n], &h), Parsed::Short(_) | Parsed::Bad(_)),
                "cut at {n} went unnoticed"
            );
        }
        assert_eq!(SegmentHeader::decode(&h.encode()), Some(h));
    }

    #[test]
    fn a_scanner_skips_a_damaged_frame_and_stops_at_a_torn_tail() {
        let h = header();
        let mut b = h.encode().to_vec();
        let mut ends = Vec::new();
        for i in 0..5u64 {
            put_frame(&mut b, &h, 1000 + i, h.base_time, &[i as u8; 20]);
            ends.push(b.len() as u64);
        }
        // Damage the second frame's body, and tear the last one.
        b[ends[0] as usize + 10] ^= 1;
        b.truncate(ends[4] as usize - 3);
        b.extend_from_slice(&[0; 7]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.seg");
        std::fs::write(&path, &b).unwrap();
        let f = File::open(&path).unwrap();
        let mut s = Scanner::new(&f, h, SEGMENT_HEADER_LEN, b.len() as u64);
        let mut seen = Vec::new();
        loop {
            match s.next_item().unwrap() {
                Item::Frame { seq, .. } => seen.push(format!("{seq}")),
                Item::Corrupt { off, .. } => seen.push(format!("corrupt@{off}")),
                Item::Torn { off } => {
                    seen.push(format!("torn@{off}"));
                    break;
                }
                Item::End => break,
            }
        }
        assert_eq!(
            seen,
            vec![
                "1000".to_string(),
                format!("corrupt@{}", ends[0]),
                "1002".into(),
                "1003".into(),
                format!("torn@{}", ends[3])
            ]
        );
    }

    #[test]
    fn an_ack_slot_round_trips_and_a_torn_one_falls_back_to_the_other() {
        let mut a = AckState {
            generation: 7,
            next_seq: 99,
            closed: true,
            pos: Default::default(),
        };
        a.pos[1] = AckPos {
            head_seg: 3,
            head_off: 4096,
            removed: vec![50, 52],
        };
        let mut b = a.clone();
        b.generation = 8;
        b.pos[1].head_off = 5000;
        let mut file = vec![0u8; 2 * ACK_SLOT];
        file[ACK_SLOT..].copy_from_slice(&a.encode()); // generation 7: slot 1
        file[..ACK_SLOT].copy_from_slice(&b.encode()); // generation 8: slot 0
        assert_eq!(AckState::read(&file), Some(b));
        file[20] ^= 1;
        assert_eq!(AckState::read(&file), Some(a));
    }
}

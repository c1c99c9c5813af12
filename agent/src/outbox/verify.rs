//! `edgestream outbox verify`: an offline check of an outbox directory. It reads every
//! segment as opening would, reports records, bytes, the oldest record's age and anything
//! damaged per segment, and with `repair` truncates torn tails exactly as opening does.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::outbox::log::{
    list_segments, AckState, Item, Scanner, SegmentHeader, ACK_FILE, SEGMENT_HEADER_LEN,
};
use crate::outbox::record::counted_size;

/// What verification found in one segment file.
#[derive(Debug, Clone, Default)]
pub struct SegmentCheck {
    pub path: PathBuf,
    /// Records not yet acknowledged, and their counted bytes.
    pub records: u64,
    pub bytes: u64,
    /// Records still in the file but acknowledged.
    pub acknowledged: u64,
    /// Append time (unix secs) of its oldest unacknowledged record.
    pub oldest: Option<u64>,
    /// Offsets of damaged frames (skipped by the agent).
    pub corrupt: Vec<u64>,
    /// A torn tail: its offset and length (truncated at open, or by `repair`).
    pub torn: Option<(u64, u64)>,
    pub repaired: bool,
    /// The header is unreadable: the agent sets the file aside.
    pub bad_header: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Verification {
    pub segments: Vec<SegmentCheck>,
    /// Whether an acknowledgement file was found and intact.
    pub acks_intact: bool,
    /// A sled store of an earlier release is present (migrated on the next start).
    pub legacy_store: bool,
}

impl Verification {
    pub fn records(&self) -> u64 {
        self.segments.iter().map(|s| s.records).sum()
    }

    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    pub fn oldest(&self) -> Option<u64> {
        self.segments.iter().filter_map(|s| s.oldest).min()
    }

    /// Damage that remains after this run (torn tails count unless repaired).
    pub fn damaged(&self) -> bool {
        self.segments
            .iter()
            .any(|s| !s.corrupt.is_empty() || s.bad_header || (s.torn.is_some() && !s.repaired))
    }

    /// The report printed by the command.
    pub fn render(&self, now: u64) -> String {
        let mut o = String::new();
        let age = |t: Option<u64>| match t {
            Some(t) => format!("{} s", now.saturating_sub(t)),
            None => "-".into(),
        };
        for s in &self.segments {
            let name = s.path.file_name().unwrap_or_default().to_string_lossy();
            let _ = write!(
                o,
                "{name}: {} records, {} bytes, oldest {}",
                s.records,
                s.bytes,
                age(s.oldest)
            );
            if s.acknowledged > 0 {
                let _ = write!(o, ", {} acknowledged", s.acknowledged);
            }
            if s.bad_header {
                let _ = write!(o, ", CORRUPT header (set aside at start)");
            }
            if !s.corrupt.is_empty() {
                let _ = write!(
                    o,
                    ", CORRUPT {} record(s) at offsets {:?} (skipped at start)",
                    s.corrupt.len(),
                    s.corrupt
                );
            }
            if let Some((off, len)) = s.torn {
                let what = if s.repaired { "truncated" } else { "TORN tail" };
                let _ = write!(o, ", {what}: {len} bytes from offset {off}");
            }
            o.push('\n');
        }
        if !self.acks_intact {
            o.push_str(
                "acknowledgement file missing or unreadable: every stored record counts as unacknowledged\n",
            );
        }
        if self.legacy_store {
            o.push_str(
                "a sled store of an earlier release is present: it is migrated on the next start\n",
            );
        }
        let _ = writeln!(
            o,
            "total: {} records, {} bytes, oldest {}, {}",
            self.records(),
            self.bytes(),
            age(self.oldest()),
            if self.damaged() { "DAMAGED" } else { "intact" }
        );
        o
    }
}

/// The outbox directory of a data directory (`data_dir/outbox`), or `dir` itself if it is
/// one.
pub fn outbox_dir(dir: &Path) -> PathBuf {
    let inner = dir.join("outbox");
    if inner.is_dir() {
        inner
    } else {
        dir.to_path_buf()
    }
}

/// Checks the outbox directory `dir` (the agent's `data_dir/outbox`). Fails if the store is
/// in use (it is locked while the agent runs). With `repair`, torn tails are truncated.
pub fn verify(dir: &Path, repair: bool) -> io::Result<Verification> {
    if !dir.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{} is not an outbox directory", dir.display()),
        ));
    }
    let lock_path = dir.join("lock");
    let _lock = if lock_path.exists() {
        let f = OpenOptions::new().write(true).open(&lock_path)?;
        fs2::FileExt::try_lock_exclusive(&f).map_err(|_| {
            io::Error::new(
                io::ErrorKind::WouldBlock,
                "the outbox is in use (is the agent running?)",
            )
        })?;
        Some(f)
    } else {
        None
    };
    let mut v = Verification {
        legacy_store: crate::outbox::legacy::present(dir),
        ..Default::default()
    };
    let acks = std::fs::read(dir.join(ACK_FILE))
        .ok()
        .and_then(|b| AckState::read(&b));
    v.acks_intact = acks.is_some();
    let acks = acks.unwrap_or_default();
    for (pi, list) in list_segments(dir)?.iter().enumerate() {
        let ack = &acks.pos[pi];
        let removed: std::collections::BTreeSet<u64> = ack.removed.iter().copied().collect();
        for (id, path) in list {
            let mut check = SegmentCheck {
                path: path.clone(),
                ..Default::default()
            };
            let file = OpenOptions::new().read(true).write(repair).open(path)?;
            let len = file.metadata()?.len();
            let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
            let header = file
                .read_exact_at(&mut h, 0)
                .ok()
                .and_then(|()| SegmentHeader::decode(&h))
                .filter(|h| h.priority as usize == pi);
            let Some(header) = header else {
                check.bad_header = true;
                v.segments.push(check);
                continue;
            };
            let head = if *id < ack.head_seg {
                u64::MAX
            } else if *id == ack.head_seg {
                ack.head_off
            } else {
                0
            };
            let mut scan = Scanner::new(&file, header, SEGMENT_HEADER_LEN, len);
            loop {
                match scan.next_item()? {
                    Item::Frame { off, seq, time, .. } => {
                        if off < head || removed.contains(&seq) {
                            check.acknowledged += 1;
                        } else {
                            check.records += 1;
                            check.bytes += counted_size(scan.body().len(), 9);
                            check.oldest = Some(check.oldest.map_or(time, |o| o.min(time)));
                        }
                    }
                    Item::Corrupt { off, .. } => check.corrupt.push(off),
                    Item::Torn { off } => {
                        check.torn = Some((off, len - off));
                        if repair {
                            file.set_len(off)?;
                            file.sync_all()?;
                            check.repaired = true;
                        }
                        break;
                    }
                    Item::End => break,
                }
            }
            v.segments.push(check);
        }
    }
    Ok(v)
}

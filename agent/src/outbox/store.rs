//! The durable outbox: every record bound for the cloud waits here until the cloud broker has
//! acknowledged it. An append-only log of segment files per priority (format in `log.rs`).
//!
//! Guarantees, each with the test that proves it:
//! - **The contract is a model.** [`OutboxStore`] is the interface; [`Outbox`] is held against
//!   an in-memory model over random append/read/ack/reopen sequences with random caps and both
//!   full-policies, with segments small enough that appends span several
//!   (`outbox::store::tests::outbox_matches_the_model`).
//! - **Accepted means on disk, also through a power cut.** An append writes its frames to the
//!   end of the priority's open segment (one `pwrite` per segment touched). [`Outbox::flush`]
//!   is the group commit: `fdatasync` of every segment written since the last one, an fsync
//!   of the directory if a segment file was created or deleted, and the acknowledgement file
//!   when it is due. With `durability = "batch"` (the default) it is awaited after every
//!   appended batch and before anything is acknowledged to the producer. With `"interval"` a
//!   background thread commits every `flush_interval_ms`: a power cut loses at most what was
//!   appended in the last interval (plus the commit in progress), never older records.
//! - **Nothing leaves before its PUBACK.** Records are removed only by [`Outbox::remove`] (or
//!   by the cap, the age limit and corruption, each counted). Acknowledgement moves the
//!   priority's head (the first record not acknowledged) past a prefix, and remembers records
//!   after it acknowledged out of order; segments wholly behind the head are deleted at once.
//!   The head and those records are written to the acknowledgement file by the next group
//!   commit at most once per [`ACK_PERSIST_INTERVAL`], by the background thread within that
//!   interval, and when the store is closed: a restart after a power cut resends at most that
//!   interval's acknowledged records (at-least-once), never loses an unacknowledged one
//!   (`a_partly_acknowledged_log_keeps_only_the_rest_across_a_restart`).
//! - **Order.** Each priority's records are read in append order; sequence numbers are unique
//!   and increase for the life of the store (the acknowledgement file keeps the next one, and
//!   opening goes past the highest stored record in any case), so the cloud can spot
//!   duplicates. After a stop that did not close the store they continue after a gap of
//!   [`SEQ_GAP_AFTER_CRASH`]: a record lost unsynced may have reached the cloud, and its
//!   number is not given to another (`acknowledgements_reach_the_disk_within_a_second_...`).
//! - **Bounded.** Counted bytes never exceed `max_bytes`. Each record counts what it took as a
//!   single sled value (9-byte key + 5-byte version/CRC header + body), more than its frame
//!   takes on disk (body + 7 to 13 bytes), so the files stay under the cap plus one segment per
//!   priority and the acknowledged records still in a partly acknowledged segment. When a
//!   batch does not fit, the full-policy either drops the oldest telemetry first, stored or in
//!   the batch itself, and alerts only when no telemetry is left; or refuses the new records
//!   (the prefix that fits is kept). Every drop is counted in `outbox_dropped_full`.
//! - **Memory does not grow with the backlog.** Only per-segment metadata (a few dozen bytes
//!   per segment), the records acknowledged out of order, and the positions of the last
//!   [`READ_CACHE`] records read are held; records are read from disk when the uplink asks.
//! - **Corruption is skipped, not fatal.** A frame that fails its CRC followed by a valid one
//!   is skipped and counted once (`outbox_corrupt`); a torn tail (nothing valid up to the end
//!   of a segment) is truncated at the last valid record on open; both are logged and reported
//!   in [`OpenReport`]. A store that cannot be opened is moved aside
//!   (`outbox.broken-<unix time>`) and a fresh one is started, loudly, reported on the
//!   retained status (`outbox_recovered`). A store locked by another holder is waited for
//!   ([`LOCK_WAIT`]) and never moved aside.
//! - **Old stores are migrated.** A sled store left by an earlier release is read (its single
//!   values and its packed segments), written into the log with its sequence numbers and
//!   append times, synced, and only then deleted (`legacy.rs`;
//!   `a_store_left_by_the_previous_release_is_read_and_continued`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::outbox::config::{Durability, FullPolicy, OutboxConfig};
use crate::outbox::fault::{Op, StorageFault, StorageStatus};
use crate::outbox::log::{
    self, list_segments, put_frame, segment_name, sync_dir, AckPos, AckState, Item, Scanner,
    SegmentHeader, ACK_FILE, ACK_SLOT, SEGMENT_HEADER_LEN,
};
use crate::outbox::record::now_secs;
use crate::outbox::record::{counted_size, Priority, Record};
use crate::telemetry::metrics::Metrics;

/// Key of a stored record: priority byte then big-endian sequence number.
pub type Key = [u8; 9];
const KEY_LEN: usize = 9;

/// Longest an acknowledgement waits to be written to disk (by a group commit or the
/// background thread); bounds what a restart after a power cut resends.
pub const ACK_PERSIST_INTERVAL: Duration = Duration::from_secs(1);

/// How far sequence numbers jump after a stop that did not close the store (a crash or a
/// power cut): records appended but not synced before it are lost, and may have reached the
/// cloud already (the uplink reads records as they are appended); their numbers are not
/// given to other records. More than any unsynced window holds (a group with `"batch"`,
/// `flush_interval_ms` of input with `"interval"`), and small enough that 2^29 such stops keep
/// numbers under 2^53 for consumers that parse JSON numbers as doubles.
pub const SEQ_GAP_AFTER_CRASH: u64 = 1 << 24;

/// Positions of this many records last read are remembered per priority, so that removing
/// them needs no disk read.
pub const READ_CACHE: usize = 4096;

/// Where a migration from sled builds the log before it replaces the old store.
const MIGRATING_DIR: &str = "migrating";
const MIGRATED_MARKER: &str = "COMPLETE";
const LOCK_FILE: &str = "lock";

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// Reading or writing the store failed (I/O error, disk full). The batch was not (or only
    /// partly) stored: do not acknowledge its inputs; retry later.
    #[error("outbox storage failed: {0}")]
    Storage(#[from] io::Error),
    /// A record could not be encoded; a bug, since every record type is encodable.
    #[error("record could not be encoded: {0}")]
    Encode(#[from] postcard::Error),
    /// The store could not be opened even after moving the old one aside, or is held by
    /// another process.
    #[error("cannot open outbox at {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot move broken outbox aside: {0}")]
    MoveAside(io::Error),
}

/// A record read back from the outbox.
#[derive(Debug, Clone)]
pub struct Stored {
    pub key: Key,
    pub seq: u64,
    pub record: Record,
    /// Bytes it occupies in the byte count.
    pub size: usize,
}

/// What happened when a store was opened: what was recovered and what was discarded. Logged
/// at open and repeated in every health message (`outbox_opened`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct OpenReport {
    /// Where a store that failed to open was moved to, and why, if that happened.
    pub moved_aside: Option<(PathBuf, String)>,
    /// Records recovered (not yet acknowledged) and their counted bytes.
    pub records: u64,
    pub bytes: u64,
    /// Damaged records skipped (counted in `outbox_corrupt`).
    pub corrupt: u64,
    /// Bytes cut off torn segment tails, and segment files discarded (a header torn at
    /// creation, or unreadable).
    pub truncated_bytes: u64,
    pub discarded_segments: u64,
    /// Records migrated from a sled store left by an earlier release.
    pub migrated: u64,
    /// The store was not closed by its previous holder (a crash or a power cut): sequence
    /// numbers continue after a gap of [`SEQ_GAP_AFTER_CRASH`].
    pub unclean: bool,
}

/// What happened to an appended batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AppendOutcome {
    pub stored: usize,
    /// Older records dropped to make room.
    pub dropped_old: usize,
    /// New records refused because the outbox was full (`full_policy = "refuse-new"`, or a
    /// single record larger than the whole cap).
    pub refused: usize,
}

#[derive(Debug, Clone)]
pub struct OutboxSettings {
    pub max_bytes: u64,
    /// Unused by the log (it keeps no page cache of its own); kept so that configs stay valid.
    pub cache_bytes: u64,
    pub durability: Durability,
    pub flush_interval_ms: u64,
    pub full_policy: FullPolicy,
    /// Telemetry older than this (since its append) is dropped; `None`: no age limit.
    pub max_age_secs: Option<u64>,
}

impl From<&OutboxConfig> for OutboxSettings {
    fn from(c: &OutboxConfig) -> Self {
        Self {
            max_bytes: c.max_bytes,
            cache_bytes: c.cache_bytes,
            durability: c.durability,
            flush_interval_ms: c.flush_interval_ms,
            full_policy: c.full_policy,
            max_age_secs: c.max_age_secs,
        }
    }
}

/// What the rules stage and the uplink need from the durable queue. [`Outbox`] implements it
/// on the segment log; the tests hold it against an in-memory model that states the intended
/// semantics (order, priorities, the byte cap and its full-policies, sequence numbers across
/// reopens). Durability ([`Outbox::flush`]) is not part of it: a model has nothing to flush.
pub trait OutboxStore {
    /// Stores `records` with fresh sequence numbers, by the full-policy. Visible to readers
    /// as it goes; durable as a whole only after a flush.
    fn append(&self, records: &[Record]) -> Result<AppendOutcome, OutboxError>;
    /// Up to `max` records of `priority` after sequence `after`, oldest first.
    fn read_after(
        &self,
        priority: Priority,
        after: Option<u64>,
        max: usize,
        out: &mut Vec<Stored>,
    ) -> Result<(), OutboxError>;
    /// Removes acknowledged records; keys already gone are ignored.
    fn remove(&self, keys: &[Key]) -> Result<usize, OutboxError>;
    /// Records stored.
    fn depth(&self) -> u64;
    /// Bytes stored, as counted against the cap.
    fn bytes(&self) -> u64;
}

impl OutboxStore for Outbox {
    fn append(&self, records: &[Record]) -> Result<AppendOutcome, OutboxError> {
        Outbox::append(self, records)
    }
    fn read_after(
        &self,
        priority: Priority,
        after: Option<u64>,
        max: usize,
        out: &mut Vec<Stored>,
    ) -> Result<(), OutboxError> {
        Outbox::read_after(self, priority, after, max, out)
    }
    fn remove(&self, keys: &[Key]) -> Result<usize, OutboxError> {
        Outbox::remove(self, keys)
    }
    fn depth(&self) -> u64 {
        Outbox::depth(self)
    }
    fn bytes(&self) -> u64 {
        Outbox::bytes(self)
    }
}

pub fn key(priority: Priority, seq: u64) -> Key {
    let mut k = [0u8; 9];
    k[0] = priority as u8;
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn seq_of(k: &[u8]) -> Option<u64> {
    let b: [u8; 8] = k.get(1..9)?.try_into().ok()?;
    Some(u64::from_be_bytes(b))
}

fn prio_of(k: &[u8]) -> Option<Priority> {
    match k.first()? {
        0 => Some(Priority::High),
        1 => Some(Priority::Low),
        _ => None,
    }
}

/// Counted size of a record whose body is `body_len` bytes (see the module doc).
fn size_of_body(body_len: usize) -> u64 {
    counted_size(body_len, KEY_LEN)
}

/// Target size of a segment file: a 64th of the cap, between 64 KiB and 4 MiB, so that a
/// drained store keeps little (one segment per priority) and a full one few files. Unit tests
/// use tiny segments so that the model test crosses many.
fn segment_bytes(max_bytes: u64) -> u64 {
    if cfg!(test) {
        300
    } else {
        (max_bytes / 64).clamp(64 << 10, 4 << 20)
    }
}

/// One segment file's metadata: all the log keeps in memory per segment.
#[derive(Debug)]
struct Seg {
    id: u64,
    header: SegmentHeader,
    /// Bytes of valid data (header included): where the next frame goes.
    len: u64,
    /// Highest sequence number seen in it (`None`: none seen from the head on).
    last_seq: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Pos {
    seg: u64,
    off: u64,
}

/// A record found while walking a log.
#[derive(Debug, Clone, Copy)]
struct Found {
    seq: u64,
    time: u64,
    size: u64,
    at: Pos,
    next: Pos,
}

/// One priority's log.
#[derive(Debug)]
struct Log {
    priority: Priority,
    segs: std::collections::VecDeque<Seg>,
    /// The open segment's file (the last of `segs`).
    active: Option<Arc<File>>,
    /// The first record not acknowledged (or the end of the last segment).
    head: Pos,
    /// Records after the head already removed (acknowledged out of order, or damaged).
    removed: BTreeSet<u64>,
    /// Frames known to be damaged (found at open or since): skipped silently.
    corrupt: BTreeSet<Pos>,
    /// Where the records last read are: seq -> (position, counted size).
    cache: BTreeMap<u64, (Pos, u64)>,
    /// The last read: the seq it ended with and the position after it.
    cursor: Option<(u64, Pos)>,
    depth: u64,
    bytes: u64,
}

impl Log {
    fn new(priority: Priority) -> Log {
        Log {
            priority,
            segs: Default::default(),
            active: None,
            head: Pos { seg: 0, off: 0 },
            removed: BTreeSet::new(),
            corrupt: BTreeSet::new(),
            cache: BTreeMap::new(),
            cursor: None,
            depth: 0,
            bytes: 0,
        }
    }

    fn path(&self, dir: &Path, id: u64) -> PathBuf {
        dir.join(segment_name(self.priority, id))
    }

    fn open_seg(&self, dir: &Path, id: u64) -> io::Result<Arc<File>> {
        if self.segs.back().is_some_and(|s| s.id == id) {
            if let Some(f) = &self.active {
                return Ok(f.clone());
            }
        }
        Ok(Arc::new(File::open(self.path(dir, id))?))
    }

    /// Walks the records from `start` on, in order, skipping removed and damaged ones, until
    /// `f` returns `false` (it is handed the record and its body). Damage found on the way is
    /// returned (new damage: frames not known before, and torn regions) for the caller to count.
    fn walk(
        &self,
        dir: &Path,
        start: Pos,
        mut f: impl FnMut(&Found, &[u8]) -> bool,
    ) -> io::Result<Vec<Pos>> {
        let mut damage = Vec::new();
        let first = self.segs.partition_point(|s| s.id < start.seg);
        for seg in self.segs.iter().skip(first) {
            let from = if seg.id == start.seg {
                start.off.max(SEGMENT_HEADER_LEN)
            } else {
                SEGMENT_HEADER_LEN
            };
            let file = self.open_seg(dir, seg.id)?;
            let mut scan = Scanner::new(&file, seg.header, from, seg.len);
            loop {
                match scan.next_item()? {
                    Item::Frame {
                        off,
                        len,
                        seq,
                        time,
                    } => {
                        let at = Pos { seg: seg.id, off };
                        if self.removed.contains(&seq) || self.corrupt.contains(&at) {
                            continue;
                        }
                        let found = Found {
                            seq,
                            time,
                            size: size_of_body(scan.body().len()),
                            at,
                            next: Pos {
                                seg: seg.id,
                                off: off + len,
                            },
                        };
                        if !f(&found, scan.body()) {
                            return Ok(damage);
                        }
                    }
                    Item::Corrupt { off, .. } => {
                        let at = Pos { seg: seg.id, off };
                        if !self.corrupt.contains(&at) {
                            damage.push(at);
                        }
                    }
                    Item::Torn { off } => {
                        damage.push(Pos { seg: seg.id, off });
                        break;
                    }
                    Item::End => break,
                }
            }
        }
        Ok(damage)
    }

    /// The first live record from the head on.
    fn peek_head(&self, dir: &Path) -> io::Result<(Option<Found>, Vec<Pos>)> {
        let mut first = None;
        let damage = self.walk(dir, self.head, |r, _| {
            first = Some(*r);
            false
        })?;
        Ok((first, damage))
    }

    /// Moves the head to the first live record (or the end), forgetting the removed records
    /// it passes, and deletes the segments wholly behind it; the open segment too once it is
    /// wholly acknowledged and at least `retire_at` bytes long (the next append starts a new
    /// one), so that a drained log gives its space back. Returns whether files were deleted.
    fn settle(&mut self, dir: &Path, retire_at: u64) -> io::Result<(bool, Vec<Pos>)> {
        let (first, damage) = self.peek_head(dir)?;
        self.head = match first {
            Some(r) => r.at,
            None => match self.segs.back() {
                Some(s) => Pos {
                    seg: s.id,
                    off: s.len,
                },
                None => self.head,
            },
        };
        let head = self.head;
        // Everything before the head is gone.
        let cut = first.map(|r| r.seq);
        match cut {
            Some(c) => {
                self.removed = self.removed.split_off(&c);
                self.cache = self.cache.split_off(&c);
            }
            None => {
                self.removed.clear();
                self.cache.clear();
            }
        }
        self.corrupt = self.corrupt.split_off(&head);
        let mut deleted = false;
        while self.segs.len() > 1 && self.segs[0].id < head.seg {
            let s = self.segs.pop_front().expect("len > 1");
            match std::fs::remove_file(self.path(dir, s.id)) {
                Ok(()) => deleted = true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    self.segs.push_front(s);
                    return Err(e);
                }
            }
        }
        if first.is_none() && self.segs.len() == 1 && self.segs[0].len >= retire_at {
            let id = self.segs[0].id;
            match std::fs::remove_file(self.path(dir, id)) {
                Ok(()) => deleted = true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            self.segs.clear();
            self.active = None;
            self.cursor = None;
            // Before every segment still to come (ids only grow).
            self.head = Pos {
                seg: id + 1,
                off: 0,
            };
        }
        Ok((deleted, damage))
    }

    /// Pops records from the head while `take` says so; returns (records, counted bytes) popped.
    fn pop_while(
        &mut self,
        dir: &Path,
        mut take: impl FnMut(&Found) -> bool,
    ) -> io::Result<(u64, u64, Vec<Pos>)> {
        let (mut n, mut bytes) = (0u64, 0u64);
        let mut last = None;
        let damage = self.walk(dir, self.head, |r, _| {
            if take(r) {
                n += 1;
                bytes += r.size;
                last = Some(*r);
                true
            } else {
                false
            }
        })?;
        if let Some(r) = last {
            self.head = r.next;
            self.removed = self.removed.split_off(&(r.seq + 1));
            self.cache = self.cache.split_off(&(r.seq + 1));
        }
        self.depth = self.depth.saturating_sub(n);
        self.bytes = self.bytes.saturating_sub(bytes);
        Ok((n, bytes, damage))
    }

    /// Where a read of records from `first` on starts.
    fn start_for(&self, first: u64, after: Option<u64>) -> Pos {
        if let (Some((seq, pos)), Some(a)) = (self.cursor, after) {
            if seq == a && pos >= self.head {
                return pos;
            }
        }
        // The last segment whose first record may be at or before `first`.
        let i = self.segs.partition_point(|s| s.header.first_seq <= first);
        match i.checked_sub(1).map(|i| &self.segs[i]) {
            Some(s) if s.id > self.head.seg => Pos {
                seg: s.id,
                off: SEGMENT_HEADER_LEN,
            },
            _ => self.head,
        }
    }

    /// The record `seq` if it is live: its position and counted size.
    fn locate(&self, dir: &Path, seq: u64) -> io::Result<Option<(Pos, u64)>> {
        if self.removed.contains(&seq) {
            return Ok(None);
        }
        if let Some(hit) = self.cache.get(&seq) {
            return Ok(Some(*hit));
        }
        let i = self.segs.partition_point(|s| s.header.first_seq <= seq);
        let Some(s) = i.checked_sub(1).map(|i| &self.segs[i]) else {
            return Ok(None);
        };
        if s.last_seq.is_none_or(|l| seq > l) || s.id < self.head.seg {
            return Ok(None);
        }
        let start = if s.id == self.head.seg {
            self.head
        } else {
            Pos {
                seg: s.id,
                off: SEGMENT_HEADER_LEN,
            }
        };
        let mut hit = None;
        self.walk(dir, start, |r, _| {
            if r.seq == seq {
                hit = Some((r.at, r.size));
            }
            r.seq < seq && r.at.seg == s.id
        })?;
        Ok(hit)
    }

    /// Records and counted bytes from the head on (for open and after damage is found).
    fn recount(&mut self, dir: &Path) -> io::Result<Vec<Pos>> {
        let (mut n, mut bytes) = (0u64, 0u64);
        let damage = self.walk(dir, self.head, |r, _| {
            n += 1;
            bytes += r.size;
            true
        })?;
        self.depth = n;
        self.bytes = bytes;
        Ok(damage)
    }
}

/// Everything the lock serialises.
#[derive(Debug)]
struct State {
    logs: [Log; 2],
    next_seq: u64,
    next_seg_id: u64,
    /// Segments written since the last group commit.
    dirty: Vec<Arc<File>>,
    /// Segment files created or deleted since the last group commit.
    dir_dirty: bool,
    /// Acknowledgements not yet written to the acknowledgement file.
    acks_dirty: bool,
    ack_generation: u64,
    last_ack_write: Instant,
}

/// A cheap handle on the shared outbox: the rules stage appends, the uplink reads and removes.
#[derive(Debug, Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    dir: PathBuf,
    settings: OutboxSettings,
    seg_bytes: u64,
    state: Mutex<State>,
    /// Serialises group commits, so that acknowledgement slots are written in order.
    commit: Mutex<()>,
    ack_file: File,
    bytes: AtomicU64,
    depth: AtomicU64,
    metrics: Arc<Metrics>,
    appended: Notify,
    open_report: OpenReport,
    /// Unix second of the last age check, so that readers check at most once a second.
    age_checked: AtomicU64,
    /// Whether appends and commits fail (a full or failing disk), as a reported state.
    fault: StorageFault,
    /// Held (flock) for the life of the store.
    _lock: File,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(e) = self.commit_as(true, true) {
            tracing::error!(error = %e, "final outbox commit failed");
        }
    }
}

/// How long opening waits for another holder of the store's lock (a previous instance still
/// exiting) before giving up.
pub const LOCK_WAIT: Duration = Duration::from_secs(5);

fn lock_dir(dir: &Path) -> io::Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK_FILE))?;
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match fs2::FileExt::try_lock_exclusive(&f) {
            Ok(()) => return Ok(f),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "could not acquire lock: the outbox is held by another process",
                ))
            }
            Err(e) => return Err(e),
        }
    }
}

fn lock_error(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

fn aside_path(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".broken-{}", now_secs()));
    dir.with_file_name(name)
}

impl Outbox {
    /// Opens the outbox in `dir` (migrating a sled store left by an earlier release), or, if
    /// the store there cannot be opened, moves it aside and starts a fresh one (reported in
    /// [`OpenReport::moved_aside`]). Every record's checksum is checked here, so the counts
    /// start exact; what was recovered and discarded is logged and reported.
    pub fn open(
        dir: &Path,
        settings: OutboxSettings,
        metrics: Arc<Metrics>,
    ) -> Result<(Outbox, OpenReport), OutboxError> {
        let outbox = match Self::open_inner(dir, &settings, &metrics) {
            Ok(o) => o,
            Err(e) if lock_error(&e) => {
                return Err(OutboxError::Open {
                    path: dir.to_path_buf(),
                    source: e,
                })
            }
            Err(first) => {
                let aside = aside_path(dir);
                std::fs::rename(dir, &aside).map_err(OutboxError::MoveAside)?;
                tracing::error!(
                    path = %dir.display(), moved_to = %aside.display(), error = %first,
                    "outbox could not be opened; moved aside and starting a fresh one"
                );
                let mut o = Self::open_inner(dir, &settings, &metrics).map_err(|source| {
                    OutboxError::Open {
                        path: dir.to_path_buf(),
                        source,
                    }
                })?;
                Arc::get_mut(&mut o.inner)
                    .expect("not shared yet")
                    .open_report
                    .moved_aside = Some((aside, first.to_string()));
                o
            }
        };
        let r = outbox.inner.open_report.clone();
        tracing::info!(
            records = r.records,
            bytes = r.bytes,
            corrupt = r.corrupt,
            truncated_bytes = r.truncated_bytes,
            discarded_segments = r.discarded_segments,
            migrated = r.migrated,
            "outbox opened: recovered {} records ({} bytes); discarded {} damaged records, {} torn bytes, {} segment files",
            r.records,
            r.bytes,
            r.corrupt,
            r.truncated_bytes,
            r.discarded_segments,
        );
        outbox.start_background();
        Ok((outbox, r))
    }

    fn open_inner(
        dir: &Path,
        settings: &OutboxSettings,
        metrics: &Arc<Metrics>,
    ) -> io::Result<Outbox> {
        let mut report = OpenReport::default();
        std::fs::create_dir_all(dir)?;
        let lock = lock_dir(dir)?;
        if crate::outbox::legacy::present(dir) || dir.join(MIGRATING_DIR).exists() {
            report.migrated = migrate(dir, settings, metrics)?;
        }
        let (state, acks) = load(dir, metrics, &mut report)?;
        let ack_file = acks;
        let (depth, bytes) = state
            .logs
            .iter()
            .fold((0, 0), |(d, b), l| (d + l.depth, b + l.bytes));
        report.records = depth;
        report.bytes = bytes;
        Metrics::set(&metrics.outbox_bytes, bytes);
        Metrics::set(&metrics.outbox_depth, depth);
        let outbox = Outbox {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                settings: settings.clone(),
                seg_bytes: segment_bytes(settings.max_bytes),
                state: Mutex::new(state),
                commit: Mutex::new(()),
                ack_file,
                bytes: AtomicU64::new(bytes),
                depth: AtomicU64::new(depth),
                metrics: metrics.clone(),
                appended: Notify::new(),
                open_report: report,
                age_checked: AtomicU64::new(0),
                fault: StorageFault::default(),
                _lock: lock,
            }),
        };
        // From here until it is closed, the disk says the store is open: a stop without the
        // closing commit is known as one at the next open.
        outbox.state().acks_dirty = true;
        outbox.inner.commit(true)?;
        Ok(outbox)
    }

    /// The thread that commits on a timer: every `flush_interval_ms` with `"interval"`
    /// durability; acknowledgements only, every [`ACK_PERSIST_INTERVAL`], with `"batch"`
    /// (whose appends are committed by their producers). It ends with the store.
    fn start_background(&self) {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let every = match self.inner.settings.durability {
            Durability::Interval => Duration::from_millis(self.inner.settings.flush_interval_ms),
            Durability::Batch => ACK_PERSIST_INTERVAL,
        };
        let spawned = std::thread::Builder::new()
            .name("outbox-commit".into())
            .spawn(move || {
                let tick = every.min(Duration::from_millis(100));
                let mut last = Instant::now();
                loop {
                    std::thread::sleep(tick);
                    let Some(inner) = weak.upgrade() else { return };
                    if last.elapsed() >= every {
                        last = Instant::now();
                        if let Err(e) = inner.commit(true) {
                            tracing::error!(error = %e, "outbox background commit failed");
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "outbox commit thread not started; acknowledgements are written by group commits only");
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores `records`, assigning their sequence numbers, making room or refusing by the
    /// full-policy. Not durable until [`Outbox::flush`] returns. If a write fails half-way,
    /// the frames written stay (a retry stores those records a second time: duplicates,
    /// never a loss).
    pub fn append(&self, records: &[Record]) -> Result<AppendOutcome, OutboxError> {
        self.append_at(records, now_secs())
    }

    /// [`Outbox::append`] at unix second `now` (the records' append time; tests move it).
    pub(crate) fn append_at(
        &self,
        records: &[Record],
        now: u64,
    ) -> Result<AppendOutcome, OutboxError> {
        let result = self.append_unobserved(records, now);
        let inner = &*self.inner;
        match &result {
            Ok(_) => inner.fault.succeeded(Op::Append, &inner.metrics),
            Err(OutboxError::Storage(e)) => inner.fault.failed(Op::Append, e, &inner.metrics),
            Err(_) => {}
        }
        result
    }

    fn append_unobserved(
        &self,
        records: &[Record],
        now: u64,
    ) -> Result<AppendOutcome, OutboxError> {
        let inner = &*self.inner;
        let mut outcome = AppendOutcome::default();
        // The bodies, all in one buffer, each a range of it.
        let mut bytes = Vec::with_capacity(records.len() * 48);
        let mut encoded: Vec<(Priority, std::ops::Range<usize>)> =
            Vec::with_capacity(records.len());
        for r in records {
            let start = bytes.len();
            r.encode_body_into(&mut bytes)?;
            encoded.push((r.priority(), start..bytes.len()));
        }
        let size = |v: &std::ops::Range<usize>| size_of_body(v.len());
        let mut st = self.state();
        // Expired telemetry goes first: it must not take room (or cause drops) from new records.
        self.expire_locked(&mut st, now)?;
        let max = inner.settings.max_bytes;
        encoded.retain(|(_, v)| {
            let fits = size(v) <= max;
            if !fits {
                outcome.refused += 1;
            }
            fits
        });
        let need: u64 = encoded.iter().map(|(_, v)| size(v)).sum();
        let held = st.logs[0].bytes + st.logs[1].bytes;
        if held + need > max {
            match inner.settings.full_policy {
                FullPolicy::DropOldestTelemetry => {
                    let mut excess = held + need - max;
                    for prio in [Priority::Low, Priority::High] {
                        let log = &mut st.logs[prio as usize];
                        let (n, _, damage) = log.pop_while(&inner.dir, |r| {
                            if excess == 0 {
                                return false;
                            }
                            excess = excess.saturating_sub(r.size);
                            true
                        })?;
                        outcome.dropped_old += n as usize;
                        self.after_damage(&mut st, prio, damage)?;
                        let mut i = 0;
                        while excess > 0 && i < encoded.len() {
                            if encoded[i].0 == prio {
                                let (_, v) = encoded.remove(i);
                                excess = excess.saturating_sub(size(&v));
                                outcome.dropped_old += 1;
                            } else {
                                i += 1;
                            }
                        }
                    }
                    for prio in [Priority::Low, Priority::High] {
                        self.settle(&mut st, prio)?;
                    }
                }
                FullPolicy::RefuseNew => {
                    let mut room = max.saturating_sub(held);
                    let before = encoded.len();
                    let mut keep = 0;
                    for (_, v) in &encoded {
                        let n = size(v);
                        if n > room {
                            break;
                        }
                        room -= n;
                        keep += 1;
                    }
                    encoded.truncate(keep);
                    outcome.refused += before - keep;
                }
            }
        }
        // Sequence numbers in batch order, then each priority's frames written in order.
        let first_seq = st.next_seq;
        st.next_seq += encoded.len() as u64;
        for prio in [Priority::High, Priority::Low] {
            let items = encoded
                .iter()
                .enumerate()
                .filter(|(_, (p, _))| *p == prio)
                .map(|(i, (_, r))| (first_seq + i as u64, now, &bytes[r.clone()]));
            self.write_frames(&mut st, prio, items)?;
        }
        outcome.stored = encoded.len();
        self.publish_counts(&st);
        drop(st);
        let m = &inner.metrics;
        Metrics::add(&m.outbox_appended, outcome.stored as u64);
        Metrics::add(
            &m.outbox_dropped_full,
            (outcome.dropped_old + outcome.refused) as u64,
        );
        if outcome.dropped_old + outcome.refused > 0 {
            tracing::warn!(
                dropped_old = outcome.dropped_old,
                refused = outcome.refused,
                "outbox full"
            );
        }
        if outcome.stored > 0 {
            inner.appended.notify_one();
        }
        Ok(outcome)
    }

    /// Writes frames for `(seq, time, body)` in order to the end of `prio`'s log, starting a
    /// new segment when the open one would pass its target size.
    fn write_frames<'b>(
        &self,
        st: &mut State,
        prio: Priority,
        items: impl Iterator<Item = (u64, u64, &'b [u8])>,
    ) -> io::Result<()> {
        let inner = &*self.inner;
        let mut buf: Vec<u8> = Vec::new();
        let mut pending: Vec<(u64, u64)> = Vec::new(); // (seq, counted size)
        let mut rolled = false;
        for (seq, time, body) in items {
            let log = &st.logs[prio as usize];
            let room = log.segs.back().is_some_and(|s| {
                s.len + (buf.len() + log::max_frame_len(body.len())) as u64 <= inner.seg_bytes
                    || (s.len == SEGMENT_HEADER_LEN && buf.is_empty())
            });
            if !room || log.active.is_none() {
                self.write_pending(st, prio, &mut buf, &mut pending)?;
                self.new_segment(st, prio, seq, time)?;
                rolled = true;
            }
            let log = &st.logs[prio as usize];
            let header = log.segs.back().expect("a segment").header;
            put_frame(&mut buf, &header, seq, time, body);
            pending.push((seq, size_of_body(body.len())));
        }
        self.write_pending(st, prio, &mut buf, &mut pending)?;
        if rolled {
            // The segment before may be wholly acknowledged already.
            self.settle(st, prio)?;
        }
        Ok(())
    }

    fn write_pending(
        &self,
        st: &mut State,
        prio: Priority,
        buf: &mut Vec<u8>,
        pending: &mut Vec<(u64, u64)>,
    ) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let log = &mut st.logs[prio as usize];
        let file = log.active.clone().expect("an open segment");
        let seg = log.segs.back_mut().expect("a segment");
        if let Err(e) = file.write_all_at(buf, seg.len) {
            // Whatever part was written is past `len` and gets overwritten by the next append.
            buf.clear();
            pending.clear();
            return Err(e);
        }
        seg.len += buf.len() as u64;
        for (seq, size) in pending.drain(..) {
            seg.last_seq = Some(seq);
            log.depth += 1;
            log.bytes += size;
        }
        buf.clear();
        if !st.dirty.iter().any(|f| Arc::ptr_eq(f, &file)) {
            st.dirty.push(file);
        }
        Ok(())
    }

    fn new_segment(&self, st: &mut State, prio: Priority, seq: u64, time: u64) -> io::Result<()> {
        let id = st.next_seg_id;
        let header = SegmentHeader {
            priority: prio,
            first_seq: seq,
            base_time: time,
        };
        let log = &mut st.logs[prio as usize];
        let path = log.path(&self.inner.dir, id);
        let f = OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&path)?;
        if let Err(e) = f.write_all_at(&header.encode(), 0) {
            // A disk full now may have room later: the next attempt creates this id again.
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        st.next_seg_id += 1;
        let log = &mut st.logs[prio as usize];
        log.segs.push_back(Seg {
            id,
            header,
            len: SEGMENT_HEADER_LEN,
            last_seq: None,
        });
        let f = Arc::new(f);
        log.active = Some(f.clone());
        st.dirty.push(f);
        st.dir_dirty = true;
        Ok(())
    }

    /// [`Log::settle`] with its side effects: deleted files make the directory dirty, and
    /// damage found is counted.
    fn settle(&self, st: &mut State, prio: Priority) -> io::Result<()> {
        let retire_at = self.inner.seg_bytes / 4;
        let (deleted, damage) = st.logs[prio as usize].settle(&self.inner.dir, retire_at)?;
        st.dir_dirty |= deleted;
        st.acks_dirty = true;
        self.after_damage(st, prio, damage)
    }

    /// Counts damage found since open (a frame that fails its CRC, a torn region), marks it
    /// to be skipped, and recounts the log (what a damaged frame held cannot be trusted).
    fn after_damage(&self, st: &mut State, prio: Priority, damage: Vec<Pos>) -> io::Result<()> {
        if damage.is_empty() {
            return Ok(());
        }
        let log = &mut st.logs[prio as usize];
        for at in damage {
            tracing::error!(priority = ?prio, segment = at.seg, offset = at.off, "corrupt outbox record skipped");
            if log.corrupt.insert(at) {
                Metrics::inc(&self.inner.metrics.outbox_corrupt);
            }
        }
        log.recount(&self.inner.dir)?;
        self.publish_counts(st);
        Ok(())
    }

    fn publish_counts(&self, st: &State) {
        let depth = st.logs[0].depth + st.logs[1].depth;
        let bytes = st.logs[0].bytes + st.logs[1].bytes;
        self.inner.depth.store(depth, Ordering::Release);
        self.inner.bytes.store(bytes, Ordering::Release);
        Metrics::set(&self.inner.metrics.outbox_bytes, bytes);
        Metrics::set(&self.inner.metrics.outbox_depth, depth);
    }

    /// Drops telemetry older than `max_age_secs`, if set; checked at most once a second by
    /// readers, and on every append. Returns how many records were dropped.
    pub fn expire(&self) -> Result<usize, OutboxError> {
        self.expire_at(now_secs())
    }

    pub(crate) fn expire_at(&self, now: u64) -> Result<usize, OutboxError> {
        if self.inner.settings.max_age_secs.is_none() {
            return Ok(0);
        }
        let mut st = self.state();
        self.expire_locked(&mut st, now)
    }

    /// Cheap enough for every read: one atomic compare unless a second has passed.
    fn maybe_expire(&self) -> Result<(), OutboxError> {
        if self.inner.settings.max_age_secs.is_none() {
            return Ok(());
        }
        let now = now_secs();
        if self.inner.age_checked.swap(now, Ordering::AcqRel) != now {
            self.expire_at(now)?;
        }
        Ok(())
    }

    /// [`Outbox::expire_at`] with the lock held. Telemetry is dropped from the head while it
    /// is too old; the walk stops at the first record young enough (append times only grow
    /// along the log, short of a clock stepped back, which at worst keeps old telemetry a
    /// little longer).
    fn expire_locked(&self, st: &mut State, now: u64) -> Result<usize, OutboxError> {
        let Some(max_age) = self.inner.settings.max_age_secs else {
            return Ok(0);
        };
        let log = &mut st.logs[Priority::Low as usize];
        let (records, _, damage) =
            log.pop_while(&self.inner.dir, |r| now.saturating_sub(r.time) > max_age)?;
        self.after_damage(st, Priority::Low, damage)?;
        if records == 0 {
            return Ok(0);
        }
        self.settle(st, Priority::Low)?;
        self.publish_counts(st);
        Metrics::add(&self.inner.metrics.outbox_dropped_age, records);
        tracing::warn!(
            dropped = records,
            max_age_secs = max_age,
            "telemetry older than the outbox age limit dropped"
        );
        Ok(records as usize)
    }

    /// The group commit: makes everything appended so far durable (see the module doc).
    pub async fn flush(&self) -> Result<(), OutboxError> {
        let inner = self.inner.clone();
        let done = tokio::task::spawn_blocking(move || inner.commit(false))
            .await
            .map_err(io::Error::other)?;
        done?;
        Metrics::inc(&self.inner.metrics.outbox_flushes);
        Ok(())
    }

    /// [`Outbox::flush`] for callers outside an async context (tests, benches, tools); it
    /// also writes pending acknowledgements, whenever they were last written.
    pub fn flush_blocking(&self) -> Result<(), OutboxError> {
        self.inner.commit(true)?;
        Metrics::inc(&self.inner.metrics.outbox_flushes);
        Ok(())
    }

    /// Whether storage works now, or since when and how it fails (see `fault.rs`).
    pub fn storage_status(&self) -> StorageStatus {
        self.inner.fault.status()
    }

    /// What happened when this store was opened, for the status message.
    pub fn open_report(&self) -> &OpenReport {
        &self.inner.open_report
    }

    /// Whether producers must await [`Outbox::flush`] before acknowledging their inputs.
    pub fn flush_per_batch(&self) -> bool {
        self.inner.settings.durability == Durability::Batch
    }

    /// Reads up to `max` records of `priority` with sequence numbers after `after`, in order.
    /// Damaged records are skipped and counted, and reading goes on past them.
    pub fn read_after(
        &self,
        priority: Priority,
        after: Option<u64>,
        max: usize,
        out: &mut Vec<Stored>,
    ) -> Result<(), OutboxError> {
        if priority == Priority::Low {
            self.maybe_expire()?;
        }
        let first = match after {
            Some(s) => match s.checked_add(1) {
                Some(n) => n,
                None => return Ok(()),
            },
            None => 0,
        };
        if max == 0 {
            return Ok(());
        }
        let mut st = self.state();
        let log = &st.logs[priority as usize];
        if log.depth == 0 {
            return Ok(());
        }
        let start = log.start_for(first, after);
        let mut got: Vec<(Found, Result<Record, String>)> = Vec::new();
        let mut taken = 0;
        let damage = log.walk(&self.inner.dir, start, |r, body| {
            if r.seq < first {
                return true;
            }
            let rec = Record::decode_body(body).map_err(|e| e.to_string());
            if rec.is_ok() {
                taken += 1;
            }
            got.push((*r, rec));
            taken < max
        })?;
        let log = &mut st.logs[priority as usize];
        let mut undecodable = Vec::new();
        for (r, rec) in got {
            match rec {
                Ok(record) => {
                    out.push(Stored {
                        key: key(priority, r.seq),
                        seq: r.seq,
                        record,
                        size: r.size as usize,
                    });
                    log.cache.insert(r.seq, (r.at, r.size));
                    log.cursor = Some((r.seq, r.next));
                }
                Err(e) => {
                    tracing::error!(seq = r.seq, error = %e, "undecodable outbox record skipped");
                    undecodable.push(key(priority, r.seq));
                }
            }
        }
        while log.cache.len() > READ_CACHE {
            log.cache.pop_first();
        }
        self.after_damage(&mut st, priority, damage)?;
        drop(st);
        if !undecodable.is_empty() {
            let n = self.remove(&undecodable)?;
            Metrics::add(&self.inner.metrics.outbox_corrupt, n as u64);
        }
        Ok(())
    }

    /// Counts up to `max` records of `priority` after `after`.
    pub fn count_after(
        &self,
        priority: Priority,
        after: Option<u64>,
        max: usize,
    ) -> Result<usize, OutboxError> {
        if priority == Priority::Low {
            self.maybe_expire()?;
        }
        let first = match after {
            Some(s) => match s.checked_add(1) {
                Some(n) => n,
                None => return Ok(0),
            },
            None => 0,
        };
        let st = self.state();
        let log = &st.logs[priority as usize];
        if log.depth == 0 || max == 0 {
            return Ok(0);
        }
        let mut n = 0;
        log.walk(&self.inner.dir, log.start_for(first, after), |r, _| {
            if r.seq >= first {
                n += 1;
            }
            n < max
        })?;
        Ok(n)
    }

    /// Removes acknowledged records. Keys already gone (dropped by the full-policy while in
    /// flight, or acknowledged twice) are ignored. Returns how many were removed.
    pub fn remove(&self, keys: &[Key]) -> Result<usize, OutboxError> {
        let inner = &*self.inner;
        let mut sorted = keys.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut st = self.state();
        let mut removed = 0u64;
        for prio in [Priority::High, Priority::Low] {
            let log = &mut st.logs[prio as usize];
            let mut touched = false;
            for k in sorted.iter().filter(|k| prio_of(&k[..]) == Some(prio)) {
                let Some(seq) = seq_of(k) else { continue };
                let Some((_, size)) = log.locate(&inner.dir, seq)? else {
                    continue;
                };
                log.removed.insert(seq);
                log.cache.remove(&seq);
                log.depth = log.depth.saturating_sub(1);
                log.bytes = log.bytes.saturating_sub(size);
                removed += 1;
                touched = true;
            }
            if touched {
                self.settle(&mut st, prio)?;
            }
        }
        self.publish_counts(&st);
        drop(st);
        Ok(removed as usize)
    }

    /// Resolves after the next successful append.
    pub async fn appended(&self) {
        self.inner.appended.notified().await
    }

    pub fn depth(&self) -> u64 {
        self.inner.depth.load(Ordering::Acquire)
    }

    pub fn bytes(&self) -> u64 {
        self.inner.bytes.load(Ordering::Acquire)
    }

    /// Bytes the store's files occupy on disk (for tests and the health message).
    pub fn size_on_disk(&self) -> u64 {
        std::fs::read_dir(&self.inner.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum()
    }
}

impl Inner {
    /// One group commit (see the module doc); `acks_now` writes pending acknowledgements
    /// whenever they were last written. Syncs happen outside the state lock, so appends and
    /// reads go on meanwhile.
    fn commit(&self, acks_now: bool) -> io::Result<()> {
        self.commit_as(acks_now, false)
    }

    /// [`Inner::commit`]; `closing` also writes the acknowledgement slot that marks the store
    /// closed (the last commit of its holder).
    fn commit_as(&self, acks_now: bool, closing: bool) -> io::Result<()> {
        let _one = self.commit.lock().unwrap_or_else(|p| p.into_inner());
        let (files, dir_dirty, acks) = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.acks_dirty |= closing;
            let acks_due =
                st.acks_dirty && (acks_now || st.last_ack_write.elapsed() >= ACK_PERSIST_INTERVAL);
            let acks = acks_due.then(|| {
                st.ack_generation += 1;
                st.acks_dirty = false;
                st.last_ack_write = Instant::now();
                ack_state(&st, closing)
            });
            (
                std::mem::take(&mut st.dirty),
                std::mem::replace(&mut st.dir_dirty, false),
                acks,
            )
        };
        let done = (|| {
            for f in &files {
                f.sync_data()?;
            }
            if dir_dirty {
                sync_dir(&self.dir)?;
            }
            if let Some(a) = &acks {
                a.write(&self.ack_file)?;
            }
            Ok(())
        })();
        self.fault.observe(Op::Commit, &done, &self.metrics);
        if done.is_err() {
            // Everything is synced again by the next commit.
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.dirty.extend(files);
            st.dir_dirty |= dir_dirty;
            st.acks_dirty |= acks.is_some();
        }
        done
    }
}

fn ack_state(st: &State, closed: bool) -> AckState {
    let pos = |l: &Log| AckPos {
        head_seg: l.head.seg,
        head_off: l.head.off,
        removed: l.removed.iter().copied().collect(),
    };
    AckState {
        generation: st.ack_generation,
        next_seq: st.next_seq,
        closed,
        pos: [pos(&st.logs[0]), pos(&st.logs[1])],
    }
}

/// Reads a store's files: the acknowledgement file, then every segment from each priority's
/// head, checking every frame; truncates torn tails, sets damaged segment files aside, and
/// deletes segments wholly acknowledged.
fn load(dir: &Path, metrics: &Metrics, report: &mut OpenReport) -> io::Result<(State, File)> {
    let ack_path = dir.join(ACK_FILE);
    let existed = ack_path.exists();
    let ack_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&ack_path)?;
    let mut raw = Vec::new();
    io::Read::read_to_end(&mut &ack_file, &mut raw)?;
    let acks = AckState::read(&raw);
    if existed && acks.is_none() && !raw.is_empty() {
        tracing::error!("outbox acknowledgement file unreadable; records acknowledged before it may be sent again");
    }
    if raw.len() < 2 * ACK_SLOT {
        ack_file.set_len(2 * ACK_SLOT as u64)?;
        ack_file.sync_all()?;
        sync_dir(dir)?;
    }
    report.unclean = acks.as_ref().is_some_and(|a| !a.closed);
    let acks = acks.unwrap_or_default();
    let files = list_segments(dir)?;
    // New segments must never take an id at or below an acknowledged head: opening would take
    // them for wholly acknowledged (a drained log may have deleted every file).
    let mut next_seg_id = acks.pos.iter().map(|p| p.head_seg).max().unwrap_or(0);
    let mut next_seq = acks.next_seq;
    let mut dir_dirty = false;
    let mut logs = [Log::new(Priority::High), Log::new(Priority::Low)];
    for (pi, list) in files.iter().enumerate() {
        let log = &mut logs[pi];
        let ack = &acks.pos[pi];
        let n = list.len();
        for (i, (id, path)) in list.iter().enumerate() {
            next_seg_id = next_seg_id.max(id + 1);
            let last = i + 1 == n;
            let size = std::fs::metadata(path)?.len();
            let mut h = [0u8; SEGMENT_HEADER_LEN as usize];
            let header = File::open(path)
                .and_then(|f| f.read_exact_at(&mut h, 0))
                .ok()
                .and_then(|()| SegmentHeader::decode(&h))
                .filter(|h| h.priority as usize == pi);
            let Some(header) = header else {
                report.discarded_segments += 1;
                report.truncated_bytes += size;
                dir_dirty = true;
                if size <= SEGMENT_HEADER_LEN {
                    // Created, but its header never reached the disk: nothing was ever in it.
                    tracing::warn!(path = %path.display(), bytes = size, "outbox segment torn at creation deleted");
                    std::fs::remove_file(path)?;
                } else {
                    // Damaged: set aside for inspection, never silently reused.
                    let aside = path.with_extension("damaged");
                    tracing::error!(path = %path.display(), moved_to = %aside.display(), bytes = size, last, "outbox segment with an unreadable header set aside");
                    std::fs::rename(path, aside)?;
                }
                continue;
            };
            if *id < ack.head_seg && !last {
                // Wholly acknowledged; its deletion did not reach the disk.
                std::fs::remove_file(path)?;
                dir_dirty = true;
                continue;
            }
            log.segs.push_back(Seg {
                id: *id,
                header,
                len: size,
                last_seq: None,
            });
        }
        // The head: the acknowledged position if its segment is still there, else the start
        // of the first segment after it.
        log.head = match log.segs.iter().find(|s| s.id >= ack.head_seg) {
            Some(s) if s.id == ack.head_seg => Pos {
                seg: s.id,
                off: ack.head_off.clamp(SEGMENT_HEADER_LEN, s.len),
            },
            Some(s) => Pos {
                seg: s.id,
                off: SEGMENT_HEADER_LEN,
            },
            None => match log.segs.back() {
                Some(s) => Pos {
                    seg: s.id,
                    off: s.len,
                },
                None => Pos { seg: 0, off: 0 },
            },
        };
        log.removed = ack.removed.iter().copied().collect();
        // Every frame from the head on is checked; segments are cut at a torn tail.
        let segs: Vec<(u64, SegmentHeader, u64)> =
            log.segs.iter().map(|s| (s.id, s.header, s.len)).collect();
        for (id, header, len) in segs {
            let from = if id == log.head.seg {
                log.head.off
            } else {
                SEGMENT_HEADER_LEN
            };
            if id < log.head.seg {
                continue;
            }
            let path = log.path(dir, id);
            let file = OpenOptions::new().read(true).write(true).open(&path)?;
            let mut scan = Scanner::new(&file, header, from, len);
            let mut last_seq = None;
            let mut valid_end = from;
            loop {
                match scan.next_item()? {
                    Item::Frame { off, len, seq, .. } => {
                        last_seq = Some(seq);
                        next_seq = next_seq.max(seq + 1);
                        valid_end = off + len;
                    }
                    Item::Corrupt { off, len } => {
                        tracing::error!(segment = %path.display(), offset = off, bytes = len, "corrupt outbox record skipped at open");
                        log.corrupt.insert(Pos { seg: id, off });
                        report.corrupt += 1;
                        Metrics::inc(&metrics.outbox_corrupt);
                        valid_end = off + len;
                    }
                    Item::Torn { off } => {
                        let cut = len - off;
                        tracing::warn!(segment = %path.display(), offset = off, bytes = cut, "torn outbox segment tail truncated at the last valid record");
                        file.set_len(off)?;
                        file.sync_all()?;
                        report.truncated_bytes += cut;
                        valid_end = off;
                        break;
                    }
                    Item::End => break,
                }
            }
            let seg = log
                .segs
                .iter_mut()
                .find(|s| s.id == id)
                .expect("listed above");
            seg.len = valid_end.max(SEGMENT_HEADER_LEN);
            seg.last_seq = last_seq;
        }
        // The first segment's `first_seq` bounds lookups; a head past every record is the end.
        if let Some(s) = log.segs.back() {
            if log.head.seg == s.id {
                log.head.off = log.head.off.min(s.len);
            }
            log.active = Some(Arc::new(
                OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(log.path(dir, s.id))?,
            ));
        }
        // Removed records no longer stored (acknowledged, then their segment dropped).
        let live: BTreeSet<u64> = {
            let mut v = BTreeSet::new();
            let removed = std::mem::take(&mut log.removed);
            log.walk(dir, log.head, |r, _| {
                if removed.contains(&r.seq) {
                    v.insert(r.seq);
                }
                removed.range(r.seq..).next().is_some()
            })?;
            log.removed = removed;
            v
        };
        log.removed = live;
        log.recount(dir)?;
    }
    if dir_dirty {
        sync_dir(dir)?;
    }
    if report.unclean {
        tracing::warn!(
            gap = SEQ_GAP_AFTER_CRASH,
            "outbox was not closed by its last holder (crash or power cut); sequence numbers continue after a gap"
        );
        next_seq = next_seq.saturating_add(SEQ_GAP_AFTER_CRASH);
    }
    Ok((
        State {
            logs,
            next_seq,
            next_seg_id,
            dirty: Vec::new(),
            dir_dirty: false,
            acks_dirty: false,
            ack_generation: acks.generation,
            last_ack_write: Instant::now(),
        },
        ack_file,
    ))
}

/// Moves a sled store left by an earlier release into the log: built in `migrating/`, synced,
/// marked complete, then the sled files are deleted and the log moved into place. A cut at
/// any point leaves either the sled store (migrated again from scratch) or a complete log.
fn migrate(dir: &Path, settings: &OutboxSettings, metrics: &Arc<Metrics>) -> io::Result<u64> {
    let stage = dir.join(MIGRATING_DIR);
    let marker = stage.join(MIGRATED_MARKER);
    let mut migrated = 0;
    if !marker.exists() {
        if stage.exists() {
            std::fs::remove_dir_all(&stage)?;
        }
        std::fs::create_dir(&stage)?;
        let lock = lock_dir(&stage)?;
        let report = &mut OpenReport::default();
        let (state, ack_file) = load(&stage, metrics, report)?;
        let staging = Outbox {
            inner: Arc::new(Inner {
                dir: stage.clone(),
                settings: settings.clone(),
                seg_bytes: segment_bytes(settings.max_bytes),
                state: Mutex::new(state),
                commit: Mutex::new(()),
                ack_file,
                bytes: AtomicU64::new(0),
                depth: AtomicU64::new(0),
                metrics: metrics.clone(),
                appended: Notify::new(),
                open_report: OpenReport::default(),
                age_checked: AtomicU64::new(0),
                fault: StorageFault::default(),
                _lock: lock,
            }),
        };
        let next = crate::outbox::legacy::read(dir, metrics, |prio, seq, time, body| {
            let mut st = staging.state();
            st.next_seq = st.next_seq.max(seq + 1);
            staging.write_frames(&mut st, prio, std::iter::once((seq, time, body)))?;
            migrated += 1;
            Ok(())
        })?;
        {
            let mut st = staging.state();
            st.next_seq = st.next_seq.max(next);
            st.acks_dirty = true;
        }
        staging.inner.commit(true)?;
        drop(staging);
        std::fs::remove_file(stage.join(LOCK_FILE))?;
        File::create(&marker)?.sync_all()?;
        sync_dir(&stage)?;
        // The staging directory's own entry, before anything of the sled store goes.
        sync_dir(dir)?;
        tracing::warn!(
            records = migrated,
            "outbox migrated from the sled store of an earlier release"
        );
    }
    crate::outbox::legacy::delete(dir)?;
    sync_dir(dir)?;
    for e in std::fs::read_dir(&stage)? {
        let e = e?;
        let name = e.file_name();
        if name != MIGRATED_MARKER {
            std::fs::rename(e.path(), dir.join(&name))?;
        }
    }
    sync_dir(dir)?;
    std::fs::remove_dir_all(&stage)?;
    sync_dir(dir)?;
    Ok(migrated)
}
#[cfg(test)]
mod tests {
    //! The segment-log outbox against an in-memory model of the same contract, and its recovery.

    use std::cell::RefCell;
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::outbox::record::{AlertRecord, ReadingRecord};

    /// The contract in its plainest form: a sorted map, a counter and the cap arithmetic.
    struct Model {
        max: u64,
        policy: FullPolicy,
        state: RefCell<(u64, BTreeMap<Key, Record>)>,
    }

    fn size(r: &Record) -> u64 {
        r.encode().unwrap().len() as u64 + 9
    }

    impl OutboxStore for Model {
        fn append(&self, records: &[Record]) -> Result<AppendOutcome, OutboxError> {
            let mut st = self.state.borrow_mut();
            let (next, map) = &mut *st;
            let mut out = AppendOutcome::default();
            let mut new: Vec<&Record> = Vec::new();
            for r in records {
                if size(r) > self.max {
                    out.refused += 1;
                } else {
                    new.push(r);
                }
            }
            let stored: u64 = map.values().map(size).sum();
            let mut total = stored + new.iter().map(|r| size(r)).sum::<u64>();
            match self.policy {
                FullPolicy::RefuseNew => {
                    let mut keep = 0;
                    let mut t = stored;
                    for r in &new {
                        if t + size(r) > self.max {
                            break;
                        }
                        t += size(r);
                        keep += 1;
                    }
                    out.refused += new.len() - keep;
                    new.truncate(keep);
                }
                FullPolicy::DropOldestTelemetry => {
                    for prio in [Priority::Low, Priority::High] {
                        let old: Vec<Key> = map
                            .iter()
                            .filter(|(_, r)| r.priority() == prio)
                            .map(|(k, _)| *k)
                            .collect();
                        for k in old {
                            if total <= self.max {
                                break;
                            }
                            total -= size(&map.remove(&k).unwrap());
                            out.dropped_old += 1;
                        }
                        let mut i = 0;
                        while total > self.max && i < new.len() {
                            if new[i].priority() == prio {
                                total -= size(new.remove(i));
                                out.dropped_old += 1;
                            } else {
                                i += 1;
                            }
                        }
                    }
                }
            }
            for r in new {
                map.insert(key(r.priority(), *next), r.clone());
                *next += 1;
                out.stored += 1;
            }
            Ok(out)
        }

        fn read_after(
            &self,
            priority: Priority,
            after: Option<u64>,
            max: usize,
            out: &mut Vec<Stored>,
        ) -> Result<(), OutboxError> {
            let st = self.state.borrow();
            for (k, r) in st.1.iter() {
                let seq = seq_of(k).unwrap();
                if out.len() < max && r.priority() == priority && after.is_none_or(|a| seq > a) {
                    out.push(Stored {
                        key: *k,
                        seq,
                        record: r.clone(),
                        size: size(r) as usize,
                    });
                }
            }
            Ok(())
        }

        fn remove(&self, keys: &[Key]) -> Result<usize, OutboxError> {
            let mut st = self.state.borrow_mut();
            Ok(keys.iter().filter(|k| st.1.remove(*k).is_some()).count())
        }

        fn depth(&self) -> u64 {
            self.state.borrow().1.len() as u64
        }

        fn bytes(&self) -> u64 {
            self.state.borrow().1.values().map(size).sum()
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// (alert?, payload length) per record.
        Append(Vec<(bool, usize)>),
        /// Acknowledge the records at these positions of a full read of one priority.
        Ack(bool, Vec<prop::sample::Index>),
        /// Read a page after some position and compare it.
        Page(bool, prop::sample::Index, usize),
        /// Flush, close and open the store again.
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => prop::collection::vec((prop::bool::weighted(0.2), 0usize..300), 0..12)
                .prop_map(Op::Append),
            2 => (any::<bool>(), prop::collection::vec(any::<prop::sample::Index>(), 0..6))
                .prop_map(|(h, i)| Op::Ack(h, i)),
            1 => (any::<bool>(), any::<prop::sample::Index>(), 1usize..8)
                .prop_map(|(h, i, n)| Op::Page(h, i, n)),
            1 => Just(Op::Reopen),
        ]
    }

    fn record(i: usize, alert: bool, len: usize) -> Record {
        let pad = "x".repeat(len);
        if alert {
            Record::Alert(AlertRecord {
                rule: "r".try_into().unwrap(),
                device: format!("d{i}").as_str().try_into().unwrap(),
                severity: "critical".try_into().unwrap(),
                raised: i % 2 == 0,
                value: i as f64,
                ts_ms: i as u64,
                message: pad,
            })
        } else {
            // Names are bounded (48 bytes): the padding that varies the size goes in a tag.
            Record::Reading(ReadingRecord {
                device: format!("d{i}").as_str().try_into().unwrap(),
                metric: "t".try_into().unwrap(),
                value: i as f64,
                ts_ms: i as u64,
                tags: vec![("pad".into(), pad)],
            })
        }
    }

    fn settings(max: u64, policy: FullPolicy) -> OutboxSettings {
        OutboxSettings {
            max_bytes: max,
            cache_bytes: 1 << 20,
            durability: Durability::Batch,
            flush_interval_ms: 500,
            full_policy: policy,
            max_age_secs: None,
        }
    }

    fn all(s: &dyn OutboxStore, p: Priority) -> Vec<(u64, Record)> {
        let mut v = Vec::new();
        s.read_after(p, None, usize::MAX, &mut v).unwrap();
        v.into_iter().map(|st| (st.seq, st.record)).collect()
    }

    fn prio(high: bool) -> Priority {
        if high {
            Priority::High
        } else {
            Priority::Low
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn outbox_matches_the_model(
            ops in prop::collection::vec(op(), 1..40),
            max in 400u64..4000,
            refuse in any::<bool>(),
        ) {
            let policy = if refuse { FullPolicy::RefuseNew } else { FullPolicy::DropOldestTelemetry };
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("outbox");
            let metrics = Arc::new(Metrics::default());
            let open = || Outbox::open(&path, settings(max, policy), metrics.clone()).unwrap().0;
            let mut real = open();
            let model = Model { max, policy, state: RefCell::new((0, BTreeMap::new())) };
            let mut n = 0;
            for op in ops {
                match op {
                    Op::Append(spec) => {
                        let recs: Vec<Record> = spec.iter().map(|(a, l)| { n += 1; record(n, *a, *l) }).collect();
                        let got = real.append(&recs).unwrap();
                        let want = OutboxStore::append(&model, &recs).unwrap();
                        prop_assert_eq!(got, want);
                    }
                    Op::Ack(high, idx) => {
                        let p = prio(high);
                        let mut v = Vec::new();
                        model.read_after(p, None, usize::MAX, &mut v).unwrap();
                        if !v.is_empty() {
                            let keys: Vec<Key> = idx.iter().map(|i| v[i.index(v.len())].key).collect();
                            let got = real.remove(&keys).unwrap();
                            prop_assert_eq!(got, model.remove(&keys).unwrap());
                            // A second PUBACK for the same keys (or keys dropped in flight).
                            prop_assert_eq!(real.remove(&keys).unwrap(), 0);
                        }
                    }
                    Op::Page(high, at, count) => {
                        let p = prio(high);
                        let full = all(&model, p);
                        let after = (!full.is_empty()).then(|| full[at.index(full.len())].0);
                        let (mut a, mut b) = (Vec::new(), Vec::new());
                        real.read_after(p, after, count, &mut a).unwrap();
                        model.read_after(p, after, count, &mut b).unwrap();
                        let a: Vec<_> = a.into_iter().map(|s| (s.key, s.record, s.size)).collect();
                        let b: Vec<_> = b.into_iter().map(|s| (s.key, s.record, s.size)).collect();
                        prop_assert_eq!(a, b);
                    }
                    Op::Reopen => {
                        real.flush_blocking().unwrap();
                        drop(real);
                        real = open();
                    }
                }
                for p in [Priority::High, Priority::Low] {
                    prop_assert_eq!(all(&real, p), all(&model, p));
                }
                prop_assert_eq!(real.depth(), model.depth());
                prop_assert_eq!(real.bytes(), model.bytes());
                prop_assert!(real.bytes() <= max, "{} bytes stored over a cap of {}", real.bytes(), max);
            }
        }
    }

    /// Flips a bit in the body of record `seq`'s frame, behind the outbox's back.
    fn damage(ob: &Outbox, p: Priority, seq: u64) {
        let st = ob.state();
        let log = &st.logs[p as usize];
        let (at, _) = log.locate(&ob.inner.dir, seq).unwrap().expect("stored");
        let path = log.path(&ob.inner.dir, at.seg);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        // crc (4) + three one-byte varints: the body's first byte.
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at.off + 7).unwrap();
        b[0] ^= 0x10;
        f.write_all_at(&b, at.off + 7).unwrap();
    }

    fn segment_files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.ends_with(".seg"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn a_record_damaged_on_disk_is_skipped_and_counted_and_the_counts_stay_exact() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::default());
        let (ob, _) = Outbox::open(
            dir.path(),
            settings(1 << 20, FullPolicy::RefuseNew),
            metrics.clone(),
        )
        .unwrap();
        // Three appends of telemetry (seqs 0-8), then an alert (9).
        for b in 0..3 {
            let recs: Vec<Record> = (0..3).map(|i| record(b * 3 + i, false, 10)).collect();
            ob.append(&recs).unwrap();
        }
        ob.append(&[record(9, true, 10)]).unwrap();
        let per_record = size(&record(0, false, 10));
        damage(&ob, Priority::Low, 4);
        damage(&ob, Priority::High, 9);
        let mut out = Vec::new();
        ob.read_after(Priority::Low, None, 10, &mut out).unwrap();
        let seqs: Vec<u64> = out.iter().map(|s| s.seq).collect();
        assert_eq!(seqs, vec![0, 1, 2, 3, 5, 6, 7, 8]);
        out.clear();
        ob.read_after(Priority::High, None, 10, &mut out).unwrap();
        assert!(out.is_empty());
        assert_eq!(metrics.snapshot().outbox_corrupt, 2);
        assert_eq!(ob.depth(), 8);
        assert!(
            ob.bytes() >= 8 * (per_record - 1) && ob.bytes() <= 8 * (per_record + 1),
            "{}",
            ob.bytes()
        );
        // Damage found at open is skipped there, and the counts start exact.
        damage(&ob, Priority::Low, 6);
        ob.flush_blocking().unwrap();
        drop(ob);
        let metrics = Arc::new(Metrics::default());
        let (ob, report) = Outbox::open(
            dir.path(),
            settings(1 << 20, FullPolicy::RefuseNew),
            metrics.clone(),
        )
        .unwrap();
        // Low 4 and 6 are followed by intact records: skipped and counted. The alert was the
        // last frame of its segment, which is what a torn tail looks like: truncated there.
        assert_eq!((report.records, ob.depth(), report.corrupt), (7, 7, 2));
        assert!(report.truncated_bytes > 0, "{report:?}");
        assert_eq!(metrics.snapshot().outbox_corrupt, 2);
        let seqs: Vec<u64> = all(&ob, Priority::Low)
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(seqs, vec![0, 1, 2, 3, 5, 7, 8]);
        assert!(all(&ob, Priority::High).is_empty());
        assert_eq!(
            metrics.snapshot().outbox_corrupt,
            2,
            "counted once per open"
        );
    }

    #[test]
    fn a_partly_acknowledged_log_keeps_only_the_rest_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(1 << 20, FullPolicy::RefuseNew);
        let m = Arc::new(Metrics::default());
        let (ob, _) = Outbox::open(dir.path(), s.clone(), m.clone()).unwrap();
        let recs: Vec<Record> = (0..10).map(|i| record(i, false, 10)).collect();
        ob.append(&recs).unwrap();
        let acked: Vec<Key> = (0..4).chain([7]).map(|s| key(Priority::Low, s)).collect();
        assert_eq!(ob.remove(&acked).unwrap(), 5);
        ob.flush_blocking().unwrap();
        drop(ob);
        let (ob, _) = Outbox::open(dir.path(), s.clone(), m.clone()).unwrap();
        let left: Vec<u64> = all(&ob, Priority::Low)
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(left, vec![4, 5, 6, 8, 9]);
        assert_eq!(ob.depth(), 5);
        // A page that starts after the head.
        let mut page = Vec::new();
        ob.read_after(Priority::Low, Some(5), 2, &mut page).unwrap();
        assert_eq!(page.iter().map(|s| s.seq).collect::<Vec<_>>(), vec![6, 8]);
        assert_eq!(ob.count_after(Priority::Low, Some(5), 10).unwrap(), 3);
        ob.remove(&[
            key(Priority::Low, 4),
            key(Priority::Low, 5),
            key(Priority::Low, 6),
        ])
        .unwrap();
        ob.remove(&[key(Priority::Low, 8), key(Priority::Low, 9)])
            .unwrap();
        // Acknowledged again (or dropped while in flight): nothing left to remove.
        let again: Vec<Key> = (0..10).map(|s| key(Priority::Low, s)).collect();
        assert_eq!(ob.remove(&again).unwrap(), 0);
        assert_eq!((ob.depth(), ob.bytes()), (0, 0));
        // Segments wholly acknowledged are gone; the open one too once it is long enough.
        assert!(
            segment_files(dir.path()).len() <= 1,
            "{:?}",
            segment_files(dir.path())
        );
        ob.append(&[record(10, false, 10), record(11, true, 10)])
            .unwrap();
        // Low 12 never existed and lies past the end of the log.
        let mixed = [
            key(Priority::High, 5),
            key(Priority::Low, 10),
            key(Priority::Low, 12),
        ];
        assert_eq!(ob.remove(&mixed).unwrap(), 1);
        assert_eq!(ob.depth(), 1);
        ob.flush_blocking().unwrap();
        drop(ob);
        let (ob, report) = Outbox::open(dir.path(), s, m).unwrap();
        assert_eq!(report.records, 1);
        assert_eq!(all(&ob, Priority::High).len(), 1);
    }

    #[test]
    fn acknowledgements_reach_the_disk_within_a_second_without_a_commit() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(1 << 20, FullPolicy::DropOldestTelemetry);
        let (ob, _) = Outbox::open(dir.path(), s.clone(), Arc::default()).unwrap();
        ob.append(&(0..100).map(|i| record(i, false, 10)).collect::<Vec<_>>())
            .unwrap();
        ob.flush_blocking().unwrap();
        let mut read = Vec::new();
        ob.read_after(Priority::Low, None, 60, &mut read).unwrap();
        let keys: Vec<Key> = read.iter().map(|s| s.key).collect();
        assert_eq!(ob.remove(&keys).unwrap(), 60);
        // No group commit follows (no new input): the background thread writes them.
        std::thread::sleep(ACK_PERSIST_INTERVAL + Duration::from_millis(500));
        // What a crash of the process would leave: the files as they are now.
        let copy = tempfile::tempdir().unwrap();
        for e in std::fs::read_dir(dir.path()).unwrap().flatten() {
            if e.file_name() != LOCK_FILE {
                std::fs::copy(e.path(), copy.path().join(e.file_name())).unwrap();
            }
        }
        let (again, report) = Outbox::open(copy.path(), s, Arc::default()).unwrap();
        assert_eq!((report.records, again.depth()), (40, 40));
        // Not closed: numbers continue after a gap, past any record lost unsynced.
        assert!(report.unclean);
        again.append(&[record(100, false, 10)]).unwrap();
        let last = all(&again, Priority::Low).pop().unwrap().0;
        assert_eq!(last, 100 + SEQ_GAP_AFTER_CRASH);
        drop(again);
        drop(ob);
    }

    #[test]
    fn a_torn_tail_is_truncated_at_the_last_valid_record_and_no_stored_seq_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(1 << 20, FullPolicy::DropOldestTelemetry);
        {
            let (ob, _) = Outbox::open(dir.path(), s.clone(), Arc::default()).unwrap();
            ob.append(&(0..4).map(|i| record(i, true, 5)).collect::<Vec<_>>())
                .unwrap();
            ob.flush_blocking().unwrap();
            ob.append(&(4..6).map(|i| record(i, true, 5)).collect::<Vec<_>>())
                .unwrap();
        }
        // A power cut tore the last frame: cut it in half and leave zeros after it.
        let files = segment_files(dir.path());
        let path = dir.path().join(files.last().unwrap());
        let mut b = std::fs::read(&path).unwrap();
        let whole = b.len();
        b.truncate(whole - 8);
        b.extend_from_slice(&[0; 20]);
        std::fs::write(&path, &b).unwrap();
        let (ob, report) = Outbox::open(dir.path(), s, Arc::default()).unwrap();
        assert_eq!(report.records, 5);
        assert!(report.truncated_bytes > 20, "{report:?}");
        assert!(std::fs::metadata(&path).unwrap().len() < whole as u64);
        ob.append(&[record(6, true, 5)]).unwrap();
        let got = all(&ob, Priority::High);
        let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
        // The store was closed (its last commit recorded next seq 6), so the torn record's
        // number 5 is not given again.
        assert_eq!(seqs, vec![0, 1, 2, 3, 4, 6]);
        assert!(!report.unclean);
        assert_eq!(got[5].1, record(6, true, 5));
    }

    #[test]
    fn segments_are_deleted_once_acknowledged_and_memory_is_per_segment() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(1 << 20, FullPolicy::DropOldestTelemetry);
        let (ob, _) = Outbox::open(dir.path(), s, Arc::default()).unwrap();
        for b in 0..50 {
            let recs: Vec<Record> = (0..10).map(|i| record(b * 10 + i, false, 20)).collect();
            ob.append(&recs).unwrap();
        }
        ob.flush_blocking().unwrap();
        let files = segment_files(dir.path()).len();
        assert!(files > 20, "{files}");
        let mut buf = Vec::new();
        loop {
            buf.clear();
            ob.read_after(Priority::Low, None, 50, &mut buf).unwrap();
            if buf.is_empty() {
                break;
            }
            let keys: Vec<Key> = buf.iter().map(|s| s.key).collect();
            ob.remove(&keys).unwrap();
            let st = ob.state();
            assert!(st.logs[1].removed.is_empty() && st.logs[1].cache.len() <= READ_CACHE);
        }
        ob.flush_blocking().unwrap();
        assert!(
            segment_files(dir.path()).is_empty(),
            "{:?}",
            segment_files(dir.path())
        );
        assert_eq!(ob.depth(), 0);
        // The next append starts a new segment, after every id used before.
        ob.append(&[record(0, false, 100)]).unwrap();
        assert_eq!(all(&ob, Priority::Low).len(), 1);
        assert_eq!(segment_files(dir.path()).len(), 1);
        // Also after a restart with no segment file left: the acknowledged head of the
        // drained log must not cover the segments written after it, even if the newer
        // acknowledgement slot is lost.
        // Acknowledging it drains the log again: its segment goes too.
        assert_eq!(ob.remove(&[key(Priority::Low, 500)]).unwrap(), 1);
        drop(ob);
        assert!(segment_files(dir.path()).is_empty());
        let acks = std::fs::read(dir.path().join(ACK_FILE)).unwrap();
        let s = settings(1 << 20, FullPolicy::DropOldestTelemetry);
        let (ob, _) = Outbox::open(dir.path(), s.clone(), Arc::default()).unwrap();
        ob.append(&(0..30).map(|i| record(i, false, 20)).collect::<Vec<_>>())
            .unwrap();
        ob.flush_blocking().unwrap();
        drop(ob);
        std::fs::write(dir.path().join(ACK_FILE), acks).unwrap();
        let (ob, report) = Outbox::open(dir.path(), s, Arc::default()).unwrap();
        assert_eq!((report.records, ob.depth()), (30, 30));
    }

    #[test]
    fn a_store_left_by_the_previous_release_is_read_and_continued() {
        // The sled layout: single values and packed segments under [priority][seq], the next
        // sequence number under [0xFF, b'n']. Written here with sled directly, as those
        // releases did.
        use crate::outbox::record::SegmentWriter;
        let dir = tempfile::tempdir().unwrap();
        let s = settings(1 << 20, FullPolicy::DropOldestTelemetry);
        let old: Vec<Record> = (0..8).map(|i| record(i, i % 3 == 0, 5)).collect();
        {
            let db = sled::Config::new().path(dir.path()).open().unwrap();
            let tree = db.open_tree("outbox").unwrap();
            for (i, r) in old.iter().enumerate().take(6) {
                tree.insert(key(r.priority(), i as u64), r.encode().unwrap())
                    .unwrap();
            }
            // Seqs 6 (alert) and 7 packed: a segment per priority.
            let mut w = SegmentWriter::new(6, now_secs());
            let mut body = Vec::new();
            old[6].encode_body_into(&mut body).unwrap();
            w.push(6, &body);
            tree.insert(key(Priority::High, 6), w.finish()).unwrap();
            let mut w = SegmentWriter::new(7, now_secs());
            let mut body = Vec::new();
            old[7].encode_body_into(&mut body).unwrap();
            w.push(7, &body);
            tree.insert(key(Priority::Low, 7), w.finish()).unwrap();
            tree.insert([0xFF, b'n'], &8u64.to_be_bytes()[..]).unwrap();
            db.flush().unwrap();
        }
        let m = Arc::new(Metrics::default());
        let (ob, report) = Outbox::open(dir.path(), s.clone(), m.clone()).unwrap();
        assert_eq!((report.records, report.migrated), (8, 8));
        assert!(
            !crate::outbox::legacy::present(dir.path()),
            "sled files left"
        );
        assert!(!dir.path().join(MIGRATING_DIR).exists());
        assert_eq!(ob.bytes(), old.iter().map(size).sum::<u64>());
        let high: Vec<(u64, Record)> = all(&ob, Priority::High);
        assert_eq!(
            high,
            vec![
                (0, old[0].clone()),
                (3, old[3].clone()),
                (6, old[6].clone())
            ]
        );
        ob.append(&[record(8, false, 5), record(9, false, 5)])
            .unwrap();
        let low: Vec<u64> = all(&ob, Priority::Low)
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(low, vec![1, 2, 4, 5, 7, 8, 9]);
        let keys: Vec<Key> = [1, 2, 4, 5, 7].map(|s| key(Priority::Low, s)).to_vec();
        assert_eq!(ob.remove(&keys).unwrap(), 5);
        assert_eq!(ob.depth(), 5);
        assert_eq!(m.snapshot().outbox_corrupt, 0);
        ob.flush_blocking().unwrap();
        drop(ob);
        let (ob, report) = Outbox::open(dir.path(), s, m).unwrap();
        assert_eq!((report.records, report.migrated, ob.depth()), (5, 0, 5));
    }

    #[test]
    fn a_sled_store_still_held_by_an_old_agent_is_not_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox");
        let db = sled::Config::new().path(&path).open().unwrap();
        db.open_tree("outbox")
            .unwrap()
            .insert(key(Priority::Low, 0), record(0, false, 5).encode().unwrap())
            .unwrap();
        db.flush().unwrap();
        let s = settings(1 << 20, FullPolicy::DropOldestTelemetry);
        let err = Outbox::open(&path, s.clone(), Arc::default()).unwrap_err();
        assert!(matches!(err, OutboxError::Open { .. }), "{err}");
        assert!(
            crate::outbox::legacy::present(&path),
            "the old store was touched"
        );
        drop(db);
        let (ob, report) = Outbox::open(&path, s, Arc::default()).unwrap();
        assert_eq!((report.migrated, ob.depth()), (1, 1));
        assert!(report.moved_aside.is_none());
    }

    #[test]
    fn a_migration_cut_after_it_completed_finishes_on_the_next_open() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(1 << 20, FullPolicy::DropOldestTelemetry);
        let m = Arc::new(Metrics::default());
        // A finished log in `migrating/` beside the sled files it came from.
        {
            let stage = dir.path().join(MIGRATING_DIR);
            let (ob, _) = Outbox::open(&stage, s.clone(), m.clone()).unwrap();
            ob.append(&[record(0, false, 5), record(1, true, 5)])
                .unwrap();
            ob.flush_blocking().unwrap();
            drop(ob);
            std::fs::remove_file(stage.join(LOCK_FILE)).unwrap();
            std::fs::write(stage.join(MIGRATED_MARKER), b"").unwrap();
            let db = sled::Config::new().path(dir.path()).open().unwrap();
            db.open_tree("outbox")
                .unwrap()
                .insert(key(Priority::Low, 0), record(0, false, 5).encode().unwrap())
                .unwrap();
            db.flush().unwrap();
        }
        let (ob, report) = Outbox::open(dir.path(), s, m).unwrap();
        assert_eq!((report.records, report.migrated), (2, 0));
        assert!(!crate::outbox::legacy::present(dir.path()));
        assert_eq!(ob.depth(), 2);
    }
    #[test]
    fn telemetry_past_the_age_limit_is_dropped_oldest_first_and_alerts_stay() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(Metrics::default());
        let mut s = settings(1 << 20, FullPolicy::DropOldestTelemetry);
        s.max_age_secs = Some(100);
        let (ob, _) = Outbox::open(dir.path(), s.clone(), m.clone()).unwrap();
        // From now on, so that the real clock of the readers used below expires nothing.
        let t0 = now_secs();
        // seqs 0-2 at t0 (an alert among them), 3-4 at t0 + 50, 5 at t0 + 120.
        ob.append_at(
            &[record(0, false, 5), record(1, true, 5), record(2, false, 5)],
            t0,
        )
        .unwrap();
        ob.append_at(&[record(3, false, 5), record(4, false, 5)], t0 + 50)
            .unwrap();
        assert_eq!(
            ob.expire_at(t0 + 100).unwrap(),
            0,
            "exactly the limit is not older"
        );
        // The append at t0 + 120 expires the first segment before it stores its own.
        ob.append_at(&[record(5, false, 5)], t0 + 120).unwrap();
        let low = |ob: &Outbox| -> Vec<u64> {
            all(ob, Priority::Low).into_iter().map(|(s, _)| s).collect()
        };
        assert_eq!(low(&ob), vec![3, 4, 5]);
        assert_eq!(m.snapshot().outbox_dropped_age, 2);
        assert_eq!(ob.expire_at(t0 + 151).unwrap(), 2);
        assert_eq!(low(&ob), vec![5]);
        assert_eq!(
            all(&ob, Priority::High).len(),
            1,
            "alerts are never dropped for age"
        );
        assert_eq!(ob.depth(), 2);
        assert_eq!(
            ob.bytes(),
            size(&record(5, false, 5)) + size(&record(1, true, 5))
        );
        let snap = m.snapshot();
        assert_eq!((snap.outbox_dropped_age, snap.outbox_dropped_full), (4, 0));
        // Readers check the clock too: telemetry appended long ago goes on the next read.
        let dir = tempfile::tempdir().unwrap();
        let (ob, _) = Outbox::open(dir.path(), s, m.clone()).unwrap();
        ob.append_at(&[record(0, false, 5), record(1, true, 5)], t0 - 101)
            .unwrap();
        assert_eq!(ob.count_after(Priority::Low, None, 10).unwrap(), 0);
        assert_eq!(ob.depth(), 1);
        assert_eq!(m.snapshot().outbox_dropped_age, 5);
    }

    /// A minimal agent config whose `[outbox]` table holds `outbox`.
    fn config_with_outbox(outbox: &str) -> String {
        format!(
            "[gateway]\nid = \"gw\"\ndata_dir = \"/tmp/x\"\n[cloud]\nhost = \"h\"\ntls = false\n[outbox]\n{outbox}\n"
        )
    }

    #[test]
    fn the_age_limit_is_off_by_default_and_validated() {
        use crate::config::Config;
        let cfg = config_with_outbox;
        let c = Config::from_toml(&cfg(""), None).unwrap();
        assert_eq!(OutboxSettings::from(&c.outbox).max_age_secs, None);
        let c = Config::from_toml(&cfg("max_age_secs = 86400"), None).unwrap();
        assert_eq!(OutboxSettings::from(&c.outbox).max_age_secs, Some(86400));
        for bad in ["max_age_secs = 0", "max_age_secs = 400000000"] {
            let e = Config::from_toml(&cfg(bad), None).unwrap_err();
            assert!(
                e.0.iter().any(|p| p.path == "outbox.max_age_secs"),
                "{bad}: {e:?}"
            );
        }
    }

    #[test]
    fn the_commit_linger_defaults_to_the_stages_and_is_validated() {
        use crate::config::Config;
        use crate::outbox::config::MAX_COMMIT_LINGER_MS;
        let cfg = config_with_outbox;
        let c = Config::from_toml(&cfg(""), None).unwrap();
        assert_eq!(
            std::time::Duration::from_millis(c.outbox.commit_linger_ms),
            crate::outbox::config::COMMIT_LINGER
        );
        for ok in [0, 100, MAX_COMMIT_LINGER_MS] {
            let c = Config::from_toml(&cfg(&format!("commit_linger_ms = {ok}")), None).unwrap();
            assert_eq!(c.outbox.commit_linger_ms, ok);
        }
        let bad = format!("commit_linger_ms = {}", MAX_COMMIT_LINGER_MS + 1);
        let e = Config::from_toml(&cfg(&bad), None).unwrap_err();
        assert!(
            e.0.iter()
                .any(|p| p.path == "outbox.commit_linger_ms"
                    && p.message.contains("between 0 and 1000")),
            "{e:?}"
        );
    }

    #[test]
    fn a_store_held_by_another_handle_is_not_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(Metrics::default());
        let s = settings(1 << 20, FullPolicy::RefuseNew);
        let (held, _) = Outbox::open(dir.path(), s.clone(), m.clone()).unwrap();
        held.append(&[record(0, false, 1)]).unwrap();
        let t = std::time::Instant::now();
        let err = Outbox::open(dir.path(), s, m).unwrap_err();
        assert!(matches!(err, OutboxError::Open { .. }), "{err}");
        assert!(t.elapsed() >= LOCK_WAIT, "gave up after {:?}", t.elapsed());
        assert_eq!(held.depth(), 1);
        let name = dir
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_string();
        let aside = std::fs::read_dir(dir.path().parent().unwrap())
            .unwrap()
            .flatten()
            .any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{name}.broken"))
            });
        assert!(!aside, "a store in use was moved aside");
    }

    #[test]
    fn a_store_that_cannot_be_opened_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox");
        // A file where the store's directory should be: sled cannot open it.
        std::fs::write(&path, b"not a sled database").unwrap();
        let (ob, report) = Outbox::open(
            &path,
            settings(1 << 20, FullPolicy::RefuseNew),
            Arc::new(Metrics::default()),
        )
        .unwrap();
        let (aside, why) = report.moved_aside.clone().expect("moved aside");
        assert!(aside.exists() && !why.is_empty(), "{aside:?} {why}");
        assert_eq!(ob.open_report().moved_aside, report.moved_aside);
        ob.append(&[record(0, false, 1)]).unwrap();
        assert_eq!(ob.depth(), 1);
    }
}

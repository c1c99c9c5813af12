//! The durable outbox: every record bound for the cloud waits here until the cloud broker has
//! acknowledged it.
//!
//! Guarantees, each with the test that proves it:
//! - **The contract is a model.** [`OutboxStore`] is the interface; the sled [`Outbox`] is held
//!   against an in-memory model over random append/read/ack/reopen sequences with random caps
//!   and both full-policies (`outbox::tests::sled_outbox_matches_the_model`).
//! - **Accepted means on disk.** With `durability = "batch"` (the default) [`Outbox::flush`] is
//!   awaited after every appended batch and before anything is acknowledged to the producer.
//!   sled's `insert` alone is durable only after its next background flush. `"interval"`
//!   flushes every `flush_interval_ms` instead (less SD-card wear; a power cut can lose what was
//!   acknowledged in that window). Proven by 50 SIGKILLs under load with 0 acknowledged
//!   readings lost (`outbox_crash`).
//! - **Nothing leaves before its PUBACK.** Records are removed only by [`Outbox::remove`], which
//!   the uplink calls with the keys of a publish the broker acknowledged. The records of one
//!   append are packed into segments, one run per priority (see `record.rs` for the layout);
//!   a segment partly acknowledged is stored again without the acknowledged records, in the
//!   same removal, so a restart resends only what was not acknowledged, as with single values
//!   (`outbox::tests::a_partly_acknowledged_segment_...`, `outbox_crash`).
//! - **Order.** Keys are `[priority][sequence: u64 big-endian]`, so a scan yields each priority in
//!   the order records were appended; a segment is stored under its first record's key and
//!   holds each record's own sequence number. Sequence numbers are unique and increase for the
//!   life of the store (the next one is persisted with every append, and opening goes past the
//!   highest stored record in any case), so the cloud can spot duplicates.
//! - **Bounded.** Counted bytes never exceed `max_bytes`. Each record counts what it would take
//!   as a single value (key + version/CRC header + body), whatever its packing: a segment takes
//!   less than its records' count, so packing never lets more records in than the cap says.
//!   When a batch does not fit, the full-policy either drops the oldest telemetry first, stored
//!   or in the batch itself, and alerts only when no telemetry is left, removed before the new
//!   records are written (a segment partly dropped is stored again without its oldest records);
//!   or refuses the new records (the prefix that fits is kept). Every drop is counted in
//!   `outbox_dropped_full`. sled's files are larger than the counted bytes: with a 1 MiB cap the
//!   directory peaked at about 4.5 MiB (7 MiB before segments); the documented margin is cap + 8 MiB
//!   (`outbox_outage::a_full_outbox_...`).
//! - **Corruption is skipped, not fatal.** A value that fails its checksum (a single record, or a
//!   segment with all its records) is removed, logged and counted once (`outbox_corrupt`);
//!   values are checked at open, so the counts start exact, and a value found damaged later
//!   triggers a recount. A store that cannot be opened is moved aside
//!   (`outbox.broken-<unix time>`) and a fresh one is started, reported in [`OpenReport`] and
//!   on the retained status (`outbox_recovered`) (`outbox_corruption`). A store that is merely
//!   locked by another holder is waited for ([`LOCK_WAIT`]) and never moved aside.
//! - **Old stores are read.** A store written before segments (every record a version-1 single
//!   value) opens as it is: single values are still read, acknowledged and dropped alike, and
//!   new telemetry goes into segments beside them; a format marker records that the store may
//!   now hold segments (`outbox::tests::a_store_left_by_the_previous_release_...`).

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::outbox::config::{Durability, FullPolicy, OutboxConfig};
use crate::outbox::record::{
    counted_size, DecodeError, Priority, Record, Segment, SegmentWriter, SEGMENT_VERSION,
    SINGLE_OVERHEAD,
};
use crate::telemetry::metrics::Metrics;

/// Key of a stored record: priority byte then big-endian sequence number. A segment is stored
/// under the key of its first record; the uplink still names each record by its own key.
pub type Key = [u8; 9];
const META_NEXT_SEQ: &[u8] = &[0xFF, b'n'];
/// Highest value version this store may hold (absent: written by a release before segments).
const META_FORMAT: &[u8] = &[0xFF, b'v'];

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The storage engine failed (I/O error, disk full). The batch was not (or only partly)
    /// stored: do not acknowledge its inputs; retry later.
    #[error("outbox storage failed: {0}")]
    Storage(#[from] sled::Error),
    /// A record could not be encoded; a bug, since every record type is encodable.
    #[error("record could not be encoded: {0}")]
    Encode(#[from] postcard::Error),
    /// The store could not be opened even after moving the old one aside.
    #[error("cannot open outbox at {path}: {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error("cannot move broken outbox aside: {0}")]
    MoveAside(std::io::Error),
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

/// What happened when a store was opened.
#[derive(Debug, Clone, Default)]
pub struct OpenReport {
    /// Where a store that failed to open was moved to, if that happened.
    pub moved_aside: Option<(PathBuf, String)>,
    pub records: u64,
    pub bytes: u64,
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
/// on sled; the tests hold it against an in-memory model that states the intended semantics
/// (order, priorities, the byte cap and its full-policies, sequence numbers across reopens).
/// Durability ([`Outbox::flush`]) is not part of it: a model has nothing to flush.
pub trait OutboxStore {
    /// Stores `records` with fresh sequence numbers, by the full-policy. Visible to readers
    /// as it goes (a reader may see the first records before the last); durable as a whole
    /// only after a flush.
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
    /// Bytes stored, as counted against the cap (keys + encoded values).
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

/// What [`Outbox::plan_room`] decided to drop from the store.
#[derive(Debug, Default)]
struct RoomPlan {
    /// Values to delete whole.
    removes: Vec<sled::IVec>,
    /// Segments to store again without their dropped (oldest) records.
    rewrites: Vec<(sled::IVec, Vec<u8>)>,
    /// Stored records dropped, and their counted bytes.
    records: u64,
    freed: u64,
    from_batch: usize,
}

/// A cheap handle on the shared outbox: the rules stage appends, the uplink reads and removes.
#[derive(Debug, Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    db: sled::Db,
    tree: sled::Tree,
    settings: OutboxSettings,
    /// Serialises every change to the tree (appends, removals, drops), and holds the next
    /// sequence number. Readers do not take it.
    append_lock: Mutex<u64>,
    bytes: AtomicU64,
    depth: AtomicU64,
    metrics: Arc<Metrics>,
    appended: Notify,
    open_report: OpenReport,
    /// Unix second of the last age check, so that readers check at most once a second.
    age_checked: AtomicU64,
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

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The records one stored value holds: its sequence numbers and counted sizes.
#[derive(Debug)]
struct Held {
    segment: Option<Segment>,
    /// (seq, counted size) per record, in order.
    records: Vec<(u64, u64)>,
}

/// Parses a stored value (either form) far enough to know its records. `verify` checks the
/// CRC; a value that fails is corrupt.
fn held(k: &[u8], v: &[u8], verify: bool) -> Result<Held, DecodeError> {
    let base = seq_of(k).unwrap_or(0);
    if v.first() == Some(&SEGMENT_VERSION) {
        let seg = Segment::parse(base, v, verify)?;
        let records = seg
            .entries
            .iter()
            .map(|e| (e.seq, counted_size(e.body.len(), KEY_LEN)))
            .collect();
        return Ok(Held {
            segment: Some(seg),
            records,
        });
    }
    if verify {
        Record::decode(v)?;
    } else if v.len() < SINGLE_OVERHEAD {
        return Err(DecodeError::Truncated(v.len()));
    }
    Ok(Held {
        segment: None,
        records: vec![(base, (k.len() + v.len()) as u64)],
    })
}

const KEY_LEN: usize = 9;
/// Telemetry of one append is packed into segments of about this many bytes. Larger segments
/// amortise sled's per-entry cost further but make every partial acknowledgement (a segment
/// stored again without its acknowledged records) and every sled node rewrite dearer. Unit
/// tests use a small target so that the model test also covers appends split over segments.
pub const SEGMENT_TARGET_BYTES: usize = if cfg!(test) { 600 } else { 4096 };

impl Outbox {
    /// Opens the outbox in `dir`, or, if the store there is broken, moves it aside and starts
    /// a fresh one (reported in [`OpenReport::moved_aside`]). Every value's checksum is checked
    /// here; corrupt values are removed and counted, so the counts start exact.
    pub fn open(
        dir: &Path,
        settings: OutboxSettings,
        metrics: Arc<Metrics>,
    ) -> Result<(Outbox, OpenReport), OutboxError> {
        let mut report = OpenReport::default();
        let db = match open_db_waiting(dir, &settings) {
            Ok(db) => db,
            // Another process (or a closing handle) holds the store: it is not broken, and
            // moving it aside would strand its backlog. Fail instead.
            Err(e) if is_lock_error(&e) => {
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
                report.moved_aside = Some((aside, first.to_string()));
                open_db(dir, &settings).map_err(|source| OutboxError::Open {
                    path: dir.to_path_buf(),
                    source,
                })?
            }
        };
        let tree = db.open_tree("outbox")?;
        let mut next_seq = match tree.get(META_NEXT_SEQ)? {
            Some(v) if v.len() == 8 => u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8])),
            _ => 0,
        };
        let (mut bytes, mut depth) = (0u64, 0u64);
        let mut corrupt = Vec::new();
        for item in tree.iter() {
            let (k, v) = item?;
            if k.len() != KEY_LEN || prio_of(&k).is_none() {
                continue; // metadata
            }
            match held(&k, &v, true) {
                Ok(h) => {
                    for (seq, size) in h.records {
                        next_seq = next_seq.max(seq.saturating_add(1));
                        bytes += size;
                        depth += 1;
                    }
                }
                Err(e) => {
                    tracing::error!(seq = seq_of(&k), error = %e, "corrupt outbox value removed at open");
                    corrupt.push(k);
                }
            }
        }
        for k in &corrupt {
            tree.remove(k)?;
            Metrics::inc(&metrics.outbox_corrupt);
        }
        // Values written from here on may be segments, which a release before them cannot read.
        tree.insert(META_FORMAT, &[SEGMENT_VERSION])?;
        report.records = depth;
        report.bytes = bytes;
        Metrics::set(&metrics.outbox_bytes, bytes);
        Metrics::set(&metrics.outbox_depth, depth);
        let inner = Inner {
            db,
            tree,
            settings,
            append_lock: Mutex::new(next_seq),
            bytes: AtomicU64::new(bytes),
            depth: AtomicU64::new(depth),
            metrics,
            appended: Notify::new(),
            open_report: report.clone(),
            age_checked: AtomicU64::new(0),
        };
        Ok((
            Outbox {
                inner: Arc::new(inner),
            },
            report,
        ))
    }

    /// Stores `records`, assigning their sequence numbers, making room or refusing by the
    /// full-policy. The records are packed into segments, those of each priority apart (a
    /// segment's key carries its priority). Not durable until [`Outbox::flush`] returns.
    ///
    /// The values are written one tree operation at a time, in order (room made first, then
    /// the records by sequence number, then `next_seq`), not as one sled batch: sled 0.34
    /// writes and syncs two extra log buffers per batch (`pin_log`): on the bench that was
    /// half of sled's threads' CPU, 15-20 % of the agent's, and 28 % of the bytes written. sled
    /// recovers a prefix of the operations, and every prefix is a valid outbox: each value
    /// stands alone, and [`Outbox::open`] takes `next_seq` past the highest stored record, so
    /// a crash before the flush leaves some of the group (its inputs were not acknowledged
    /// and come again: duplicates, never a loss) and never reuses a stored record's number.
    /// If sled fails half-way (a failing disk), the operations done stay and the caller's
    /// retry stores those records a second time.
    pub fn append(&self, records: &[Record]) -> Result<AppendOutcome, OutboxError> {
        self.append_at(records, now_secs())
    }

    /// [`Outbox::append`] at unix second `now` (the segments' append time; tests move it).
    pub(crate) fn append_at(
        &self,
        records: &[Record],
        now: u64,
    ) -> Result<AppendOutcome, OutboxError> {
        let inner = &*self.inner;
        let mut outcome = AppendOutcome::default();
        // Single-record form; a segment stores the body after its 5-byte header. All of them in
        // one buffer, each a range of it: one allocation per group instead of one per record
        // (those were 8 % of the agent's calls to `malloc` flat out).
        let mut bytes = Vec::with_capacity(records.len() * 64);
        let mut encoded: Vec<(Priority, Range<usize>)> = Vec::with_capacity(records.len());
        for r in records {
            let start = bytes.len();
            r.encode_into(&mut bytes)?;
            encoded.push((r.priority(), start..bytes.len()));
        }
        let size = |v: &Range<usize>| (v.len() + KEY_LEN) as u64;
        let mut next_seq = inner.append_lock.lock().unwrap_or_else(|p| p.into_inner());
        // Expired telemetry goes first: it must not take room (or cause drops) from new records.
        self.expire_locked(now)?;
        let max = inner.settings.max_bytes;
        // A record larger than the whole cap can never be stored.
        encoded.retain(|(_, v)| {
            let fits = size(v) <= max;
            if !fits {
                outcome.refused += 1;
            }
            fits
        });
        let need: u64 = encoded.iter().map(|(_, v)| size(v)).sum();
        // In the order they are applied; `None` removes.
        let mut ops: Vec<(sled::IVec, Option<sled::IVec>)> = Vec::new();
        let mut freed = 0u64;
        let mut dropped_stored = 0u64;
        let held_bytes = inner.bytes.load(Ordering::Acquire);
        if held_bytes + need > max {
            match inner.settings.full_policy {
                FullPolicy::DropOldestTelemetry => {
                    let plan = self.plan_room(held_bytes + need - max, &mut encoded)?;
                    for k in plan.removes {
                        ops.push((k, None));
                    }
                    for (k, v) in plan.rewrites {
                        ops.push((k, Some(v.into())));
                    }
                    freed = plan.freed;
                    dropped_stored = plan.records;
                    outcome.dropped_old = plan.records as usize + plan.from_batch;
                }
                FullPolicy::RefuseNew => {
                    // Keep the prefix that fits: the batch's order is preserved.
                    let mut room = max.saturating_sub(held_bytes);
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
        let mut added = 0u64;
        let appended_at = now;
        // One open segment per priority: a segment holds one priority, since its key does.
        let mut segments: [Option<(Key, SegmentWriter)>; 2] = [None, None];
        for (prio, range) in &encoded {
            let v = &bytes[range.clone()];
            let seq = *next_seq;
            *next_seq += 1;
            added += size(range);
            let k = key(*prio, seq);
            let body = &v[SINGLE_OVERHEAD..];
            let segment = &mut segments[usize::from(*prio == Priority::High)];
            if let Some((sk, w)) =
                segment.take_if(|(_, w)| w.len() + body.len() > SEGMENT_TARGET_BYTES)
            {
                ops.push((sk[..].into(), Some(w.finish().into())));
            }
            let (_, w) = segment.get_or_insert_with(|| (k, SegmentWriter::new(seq, appended_at)));
            w.push(seq, body);
        }
        for (sk, w) in segments.into_iter().flatten() {
            ops.push((sk[..].into(), Some(w.finish().into())));
        }
        ops.push((
            META_NEXT_SEQ.into(),
            Some(next_seq.to_be_bytes()[..].into()),
        ));
        apply_in_order(&inner.tree, ops).map_err(|(_, e)| e)?;
        outcome.stored = encoded.len();
        // Every change to the tree holds `append_lock`, so these cannot race.
        let bytes = (held_bytes + added).saturating_sub(freed);
        let depth = (inner.depth.load(Ordering::Acquire) + encoded.len() as u64)
            .saturating_sub(dropped_stored);
        inner.bytes.store(bytes, Ordering::Release);
        inner.depth.store(depth, Ordering::Release);
        drop(next_seq);
        let m = &inner.metrics;
        Metrics::add(&m.outbox_appended, outcome.stored as u64);
        Metrics::add(
            &m.outbox_dropped_full,
            (outcome.dropped_old + outcome.refused) as u64,
        );
        Metrics::set(&m.outbox_bytes, bytes);
        Metrics::set(&m.outbox_depth, depth);
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

    /// Chooses what to drop so that `excess` more bytes fit, oldest first within a priority
    /// and all telemetry before any alert: stored telemetry, then the batch's own telemetry
    /// (older than the rest of the batch), then stored alerts, then the batch's alerts. Stored
    /// values are deleted, or for a segment partly dropped, stored again without its oldest
    /// records, before the new records are written; dropped batch records are taken out of
    /// `encoded`. Corrupt values are left for the reader to remove and count.
    fn plan_room(
        &self,
        mut excess: u64,
        encoded: &mut Vec<(Priority, Range<usize>)>,
    ) -> Result<RoomPlan, OutboxError> {
        let inner = &*self.inner;
        let mut plan = RoomPlan::default();
        for prio in [Priority::Low, Priority::High] {
            for item in inner.tree.scan_prefix([prio as u8]) {
                if excess == 0 {
                    break;
                }
                let (k, v) = item?;
                if k.len() != KEY_LEN {
                    continue;
                }
                let Ok(h) = held(&k, &v, true) else { continue };
                let mut n = 0;
                for (_, size) in &h.records {
                    if excess == 0 {
                        break;
                    }
                    plan.freed += size;
                    excess = excess.saturating_sub(*size);
                    n += 1;
                }
                plan.records += n as u64;
                match &h.segment {
                    Some(seg) if n < seg.entries.len() => {
                        let rest = rewrite(&k, &v, seg, |i| i >= n);
                        plan.rewrites.push((k, rest));
                    }
                    _ => plan.removes.push(k),
                }
            }
            let mut i = 0;
            while excess > 0 && i < encoded.len() {
                if encoded[i].0 == prio {
                    let (_, v) = encoded.remove(i);
                    excess = excess.saturating_sub((v.len() + KEY_LEN) as u64);
                    plan.from_batch += 1;
                } else {
                    i += 1;
                }
            }
        }
        Ok(plan)
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
        let _changes = self
            .inner
            .append_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.expire_locked(now)
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

    /// [`Outbox::expire_at`] with `append_lock` held. Segments are scanned oldest first and the
    /// scan stops at the first one young enough: append times only grow along the keys (short
    /// of a clock stepped back, which at worst keeps old telemetry a little longer). Single
    /// telemetry values written before segments carry no append time and are left to the cap.
    fn expire_locked(&self, now: u64) -> Result<usize, OutboxError> {
        let inner = &*self.inner;
        let Some(max_age) = inner.settings.max_age_secs else {
            return Ok(0);
        };
        let mut batch = sled::Batch::default();
        let (mut records, mut freed) = (0u64, 0u64);
        for item in inner.tree.scan_prefix([Priority::Low as u8]) {
            let (k, v) = item?;
            if k.len() != KEY_LEN || v.first() != Some(&SEGMENT_VERSION) {
                continue;
            }
            // Damaged values are left for the reader to remove and count as corrupt.
            let Ok(h) = held(&k, &v, true) else { continue };
            let Some(seg) = &h.segment else { continue };
            if now.saturating_sub(seg.appended_at) <= max_age {
                break;
            }
            records += h.records.len() as u64;
            freed += h.records.iter().map(|(_, s)| s).sum::<u64>();
            batch.remove(k);
        }
        if records == 0 {
            return Ok(0);
        }
        inner.tree.apply_batch(batch)?;
        let bytes = inner.bytes.load(Ordering::Acquire).saturating_sub(freed);
        let depth = inner.depth.load(Ordering::Acquire).saturating_sub(records);
        inner.bytes.store(bytes, Ordering::Release);
        inner.depth.store(depth, Ordering::Release);
        let m = &inner.metrics;
        Metrics::add(&m.outbox_dropped_age, records);
        Metrics::set(&m.outbox_bytes, bytes);
        Metrics::set(&m.outbox_depth, depth);
        tracing::warn!(
            dropped = records,
            max_age_secs = max_age,
            "telemetry older than the outbox age limit dropped"
        );
        Ok(records as usize)
    }

    /// Makes everything appended so far durable.
    pub async fn flush(&self) -> Result<(), OutboxError> {
        self.inner.db.flush_async().await?;
        Metrics::inc(&self.inner.metrics.outbox_flushes);
        Ok(())
    }

    /// [`Outbox::flush`] for callers outside an async context (tests, benches, tools).
    pub fn flush_blocking(&self) -> Result<(), OutboxError> {
        self.inner.db.flush()?;
        Metrics::inc(&self.inner.metrics.outbox_flushes);
        Ok(())
    }

    /// What happened when this store was opened (e.g. a broken store moved aside), for the
    /// status message.
    pub fn open_report(&self) -> &OpenReport {
        &self.inner.open_report
    }

    /// Whether producers must await [`Outbox::flush`] before acknowledging their inputs.
    pub fn flush_per_batch(&self) -> bool {
        self.inner.settings.durability == Durability::Batch
    }

    /// Where a scan for records of `priority` from sequence `first` on must start: the key of
    /// the value holding `first` (a segment keyed by an earlier sequence may hold it).
    fn scan_start(&self, priority: Priority, first: u64) -> Result<Vec<u8>, OutboxError> {
        let at = key(priority, first);
        Ok(
            match self.inner.tree.range(key(priority, 0)..=at).next_back() {
                Some(item) => item?.0.to_vec(),
                None => at.to_vec(),
            },
        )
    }

    /// Reads up to `max` records of `priority` with sequence numbers after `after`, in order.
    /// Corrupt values are removed and counted (a segment with all its records), and reading
    /// goes on past them.
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
        let start = self.scan_start(priority, first)?;
        let end = key(priority, u64::MAX);
        let mut corrupt = Vec::new();
        let mut undecodable = Vec::new();
        for item in self.inner.tree.range(start.as_slice()..=&end[..]) {
            if out.len() >= max {
                break;
            }
            let (k, v) = item?;
            let Some(base) = seq_of(&k).filter(|_| k.len() == KEY_LEN) else {
                continue;
            };
            if v.first() != Some(&SEGMENT_VERSION) {
                if base < first {
                    continue;
                }
                match Record::decode(&v) {
                    Ok(record) => out.push(Stored {
                        key: key(priority, base),
                        seq: base,
                        record,
                        size: k.len() + v.len(),
                    }),
                    Err(e) => {
                        tracing::error!(seq = base, error = %e, "corrupt outbox record skipped");
                        corrupt.push(k);
                    }
                }
                continue;
            }
            let seg = match Segment::parse(base, &v, true) {
                Ok(seg) => seg,
                Err(e) => {
                    tracing::error!(seq = base, error = %e, "corrupt outbox segment skipped with all its records");
                    corrupt.push(k);
                    continue;
                }
            };
            for e in seg.entries.iter().filter(|e| e.seq >= first) {
                if out.len() >= max {
                    break;
                }
                match Record::decode_body(&v[e.body.clone()]) {
                    Ok(record) => out.push(Stored {
                        key: key(priority, e.seq),
                        seq: e.seq,
                        record,
                        size: counted_size(e.body.len(), KEY_LEN) as usize,
                    }),
                    Err(err) => {
                        tracing::error!(seq = e.seq, error = %err, "undecodable outbox record skipped");
                        undecodable.push(key(priority, e.seq));
                    }
                }
            }
        }
        if !undecodable.is_empty() {
            let n = self.remove(&undecodable)?;
            Metrics::add(&self.inner.metrics.outbox_corrupt, n as u64);
        }
        if !corrupt.is_empty() {
            self.drop_corrupt(&corrupt)?;
        }
        Ok(())
    }

    /// Removes values that failed their checksum, counts them, and recounts the records and
    /// bytes held (what a corrupt value held cannot be trusted, so it is not subtracted).
    fn drop_corrupt(&self, keys: &[sled::IVec]) -> Result<(), OutboxError> {
        let inner = &*self.inner;
        let _changes = inner.append_lock.lock().unwrap_or_else(|p| p.into_inner());
        for k in keys {
            if inner.tree.remove(k)?.is_some() {
                Metrics::inc(&inner.metrics.outbox_corrupt);
            }
        }
        let (mut bytes, mut depth) = (0u64, 0u64);
        for item in inner.tree.iter() {
            let (k, v) = item?;
            if k.len() != KEY_LEN || prio_of(&k).is_none() {
                continue;
            }
            // Unverified: this is counting; a value corrupt since open is found by the reader.
            if let Ok(h) = held(&k, &v, false) {
                depth += h.records.len() as u64;
                bytes += h.records.iter().map(|(_, s)| s).sum::<u64>();
            }
        }
        inner.bytes.store(bytes, Ordering::Release);
        inner.depth.store(depth, Ordering::Release);
        Metrics::set(&inner.metrics.outbox_bytes, bytes);
        Metrics::set(&inner.metrics.outbox_depth, depth);
        Ok(())
    }

    /// Counts up to `max` records of `priority` after `after` without decoding them.
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
        let start = self.scan_start(priority, first)?;
        let end = key(priority, u64::MAX);
        let mut n = 0;
        for item in self.inner.tree.range(start.as_slice()..=&end[..]) {
            if n >= max {
                break;
            }
            let (k, v) = item?;
            if k.len() != KEY_LEN {
                continue;
            }
            // A value too damaged to count is counted as one; reading it removes it.
            let held = held(&k, &v, false).map(|h| h.records).unwrap_or_default();
            n += held
                .iter()
                .filter(|(s, _)| *s >= first)
                .count()
                .max(usize::from(held.is_empty()));
        }
        Ok(n.min(max))
    }

    /// Removes acknowledged records. Keys already gone (dropped by the full-policy while in
    /// flight) are ignored. A segment whose records are all acknowledged is deleted; one
    /// partly acknowledged is stored again without them, so that a restart resends only what
    /// is still unacknowledged. Returns how many were removed.
    ///
    /// The changes are applied one value at a time, not as one sled batch: each is valid on
    /// its own (a crash between two of them resends acknowledged records, which a crash
    /// before the next flush does anyway), and sled 0.34 writes and syncs two extra log
    /// buffers for every batch (`pin_log`), which made removals half of the outbox's disk
    /// writes.
    pub fn remove(&self, keys: &[Key]) -> Result<usize, OutboxError> {
        let inner = &*self.inner;
        // Held so that a concurrent append cannot drop (and count) the same records for room.
        let changes = inner.append_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut sorted = keys.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        // Per value: its key and what replaces it (`None`: removed), in the order applied,
        // and beside it the records and bytes that change frees.
        let mut ops: Vec<(sled::IVec, Option<sled::IVec>)> = Vec::new();
        let mut frees: Vec<(u64, u64)> = Vec::new();
        let mut corrupt = Vec::new();
        let mut i = 0;
        while i < sorted.len() {
            let want = sorted[i];
            let (Some(prio), Some(seq)) = (prio_of(&want), seq_of(&want)) else {
                i += 1;
                continue;
            };
            let Some(item) = inner.tree.range(key(prio, 0)..=want).next_back() else {
                i += 1;
                continue;
            };
            let (k, v) = item?;
            let h = match held(&k, &v, true) {
                Ok(h) => h,
                Err(_) => {
                    // Never rewrite a damaged segment (that would bless it with a fresh CRC).
                    corrupt.push(k);
                    i += 1;
                    continue;
                }
            };
            let last = h.records.last().map(|(s, _)| *s).unwrap_or(0);
            if seq > last {
                // Gone already (acknowledged twice, or dropped while in flight): the value
                // before it ends earlier.
                i += 1;
                continue;
            }
            // Every wanted key of this priority up to the value's last record is in it or gone.
            let mut gone = std::collections::HashSet::new();
            while i < sorted.len()
                && sorted[i][0] == want[0]
                && seq_of(&sorted[i]).is_some_and(|s| s <= last)
            {
                gone.insert(seq_of(&sorted[i]).unwrap_or(seq));
                i += 1;
            }
            let mut keep = Vec::with_capacity(h.records.len());
            let (mut records, mut bytes) = (0u64, 0u64);
            for (j, (s, size)) in h.records.iter().enumerate() {
                if gone.contains(s) {
                    records += 1;
                    bytes += size;
                } else {
                    keep.push(j);
                }
            }
            if keep.len() == h.records.len() {
                continue;
            }
            let rest = match &h.segment {
                Some(seg) if !keep.is_empty() => {
                    Some(rewrite(&k, &v, seg, |j| keep.binary_search(&j).is_ok()).into())
                }
                _ => None,
            };
            ops.push((k, rest));
            frees.push((records, bytes));
        }
        let (applied, failed) = match apply_in_order(&inner.tree, ops) {
            Ok(()) => (frees.len(), None),
            Err((n, e)) => (n, Some(e)),
        };
        let (removed, freed) = frees[..applied]
            .iter()
            .fold((0u64, 0u64), |(r, b), (x, y)| (r + x, b + y));
        // The counters follow what was applied, also when a change failed.
        let bytes = inner.bytes.load(Ordering::Acquire).saturating_sub(freed);
        let depth = inner.depth.load(Ordering::Acquire).saturating_sub(removed);
        inner.bytes.store(bytes, Ordering::Release);
        inner.depth.store(depth, Ordering::Release);
        Metrics::set(&inner.metrics.outbox_bytes, bytes);
        Metrics::set(&inner.metrics.outbox_depth, depth);
        drop(changes);
        if let Some(e) = failed {
            return Err(e.into());
        }
        if !corrupt.is_empty() {
            self.drop_corrupt(&corrupt)?;
        }
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

    /// Bytes sled occupies on disk (for tests and the health message).
    pub fn size_on_disk(&self) -> u64 {
        self.inner.db.size_on_disk().unwrap_or(0)
    }
}

/// Applies `ops` to `tree` one operation at a time, in order (`None` removes the key). On a
/// failure, how many were applied before it, with the error.
fn apply_in_order(
    tree: &sled::Tree,
    ops: Vec<(sled::IVec, Option<sled::IVec>)>,
) -> Result<(), (usize, sled::Error)> {
    for (n, (k, v)) in ops.into_iter().enumerate() {
        let done = match v {
            Some(v) => tree.insert(k, v).map(drop),
            None => tree.remove(k).map(drop),
        };
        done.map_err(|e| (n, e))?;
    }
    Ok(())
}

/// The segment stored under `k` as `v`, without the records whose index `keep` refuses. Keeps
/// the key (still at or below its first record) and the append time.
fn rewrite(k: &[u8], v: &[u8], seg: &Segment, keep: impl Fn(usize) -> bool) -> Vec<u8> {
    let mut w = SegmentWriter::new(seq_of(k).unwrap_or(0), seg.appended_at);
    for (i, e) in seg.entries.iter().enumerate() {
        if keep(i) {
            w.push(e.seq, &v[e.body.clone()]);
        }
    }
    w.finish()
}

fn open_db(dir: &Path, s: &OutboxSettings) -> Result<sled::Db, sled::Error> {
    let flush_every = match s.durability {
        // Every batch is flushed explicitly; background flushes would only add SD-card wear.
        Durability::Batch => None,
        Durability::Interval => Some(s.flush_interval_ms),
    };
    sled::Config::new()
        .path(dir)
        .cache_capacity(s.cache_bytes)
        .flush_every_ms(flush_every)
        .mode(sled::Mode::LowSpace)
        .open()
}

/// How long opening waits for another holder of the store's lock (a previous instance still
/// exiting, or sled's background threads of a handle just dropped) before giving up.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

fn is_lock_error(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

fn open_db_waiting(dir: &Path, s: &OutboxSettings) -> Result<sled::Db, sled::Error> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match open_db(dir, s) {
            Err(e) if is_lock_error(&e) && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r,
        }
    }
}

fn aside_path(dir: &Path) -> PathBuf {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".broken-{stamp}"));
    dir.with_file_name(name)
}

#[cfg(test)]
mod tests {
    //! The sled outbox against an in-memory model of the same contract.

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
        fn sled_outbox_matches_the_model(
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

    fn flip_last_bit(ob: &Outbox, k: Key) {
        let mut v = ob.inner.tree.get(k).unwrap().unwrap().to_vec();
        let last = v.len() - 1;
        v[last] ^= 0x10;
        ob.inner.tree.insert(k, v).unwrap();
    }

    #[test]
    fn a_value_damaged_on_disk_is_skipped_counted_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::default());
        let (ob, _) = Outbox::open(
            dir.path(),
            settings(1 << 20, FullPolicy::RefuseNew),
            metrics.clone(),
        )
        .unwrap();
        // Three appends: three telemetry segments (seqs 0-2, 3-5, 6-8) and one alert (9).
        for b in 0..3 {
            let recs: Vec<Record> = (0..3).map(|i| record(b * 3 + i, false, 10)).collect();
            ob.append(&recs).unwrap();
        }
        ob.append(&[record(9, true, 10)]).unwrap();
        let whole = ob.bytes();
        // Damage the middle segment and the alert behind the outbox's back.
        flip_last_bit(&ob, key(Priority::Low, 3));
        flip_last_bit(&ob, key(Priority::High, 9));
        let mut out = Vec::new();
        ob.read_after(Priority::Low, None, 10, &mut out).unwrap();
        let seqs: Vec<u64> = out.iter().map(|s| s.seq).collect();
        assert_eq!(seqs, vec![0, 1, 2, 6, 7, 8]);
        out.clear();
        ob.read_after(Priority::High, None, 10, &mut out).unwrap();
        assert!(out.is_empty());
        assert_eq!(metrics.snapshot().outbox_corrupt, 2);
        assert_eq!(ob.depth(), 6);
        let per_record = size(&record(0, false, 10));
        assert!(
            ob.bytes() < whole && ob.bytes() >= 6 * (per_record - 1),
            "{}",
            ob.bytes()
        );
        // Damage found at open is removed there, and the counts start exact.
        flip_last_bit(&ob, key(Priority::Low, 6));
        ob.flush_blocking().unwrap();
        drop(ob);
        let (ob, report) = Outbox::open(
            dir.path(),
            settings(1 << 20, FullPolicy::RefuseNew),
            metrics.clone(),
        )
        .unwrap();
        assert_eq!((report.records, ob.depth()), (3, 3));
        assert_eq!(metrics.snapshot().outbox_corrupt, 3);
    }

    #[test]
    fn a_partly_acknowledged_segment_keeps_only_the_rest_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(1 << 20, FullPolicy::RefuseNew);
        let m = Arc::new(Metrics::default());
        let (ob, _) = Outbox::open(dir.path(), s.clone(), m.clone()).unwrap();
        let recs: Vec<Record> = (0..10).map(|i| record(i, false, 10)).collect();
        ob.append(&recs).unwrap();
        // One segment, plus the next-seq and format markers.
        assert_eq!(ob.inner.tree.len(), 3);
        let acked: Vec<Key> = (0..4).chain([7]).map(|s| key(Priority::Low, s)).collect();
        assert_eq!(ob.remove(&acked).unwrap(), 5);
        ob.flush_blocking().unwrap();
        drop(ob);
        let (ob, _) = Outbox::open(dir.path(), s, m).unwrap();
        let left: Vec<u64> = all(&ob, Priority::Low)
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(left, vec![4, 5, 6, 8, 9]);
        assert_eq!(ob.depth(), 5);
        // A page that starts inside the segment.
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
        // Acknowledged again (or dropped while in flight): nothing left to remove, no hang.
        let again: Vec<Key> = (0..10).map(|s| key(Priority::Low, s)).collect();
        assert_eq!(ob.remove(&again).unwrap(), 0);
        assert_eq!((ob.depth(), ob.bytes(), ob.inner.tree.len()), (0, 0, 2));
        ob.append(&[record(10, false, 10), record(11, true, 10)])
            .unwrap();
        // Low 12 never existed and lies past the end of the segment before it.
        let mixed = [
            key(Priority::High, 5),
            key(Priority::Low, 10),
            key(Priority::Low, 12),
        ];
        assert_eq!(ob.remove(&mixed).unwrap(), 1);
        assert_eq!(ob.depth(), 1);
    }

    #[test]
    fn an_append_cut_short_by_a_crash_leaves_a_valid_store_and_reuses_no_stored_seq() {
        // An append writes its values in sequence order and `next_seq` last, and sled
        // recovers a prefix of the operations. The prefix built here: the first of the
        // segments a group of four alerts fills (two per segment at the test's target),
        // without the group's second segment and its `next_seq`.
        let dir = tempfile::tempdir().unwrap();
        let s = settings(1 << 20, FullPolicy::DropOldestTelemetry);
        let group: Vec<Record> = (4..8).map(|i| record(i, true, 250)).collect();
        {
            let (ob, _) = Outbox::open(dir.path(), s.clone(), Arc::default()).unwrap();
            ob.append(&(0..4).map(|i| record(i, true, 5)).collect::<Vec<_>>())
                .unwrap();
            ob.flush_blocking().unwrap();
            let before = ob.inner.tree.get(META_NEXT_SEQ).unwrap().unwrap();
            ob.append(&group).unwrap();
            let stored: Vec<sled::IVec> = ob
                .inner
                .tree
                .scan_prefix([Priority::High as u8])
                .keys()
                .map(Result::unwrap)
                .collect();
            assert_eq!(
                stored,
                [0, 4, 6].map(|s| sled::IVec::from(&key(Priority::High, s)[..])),
                "one segment for the first append, two for the group"
            );
            ob.inner.tree.remove(key(Priority::High, 6)).unwrap();
            ob.inner.tree.insert(META_NEXT_SEQ, before).unwrap();
            ob.flush_blocking().unwrap();
        }
        let (ob, report) = Outbox::open(dir.path(), s, Arc::default()).unwrap();
        assert_eq!(report.records, 6);
        ob.append(&[record(8, true, 5)]).unwrap();
        let seqs: Vec<u64> = all(&ob, Priority::High)
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(seqs, vec![0, 1, 2, 3, 4, 5, 6]);
        let (_, last) = all(&ob, Priority::High).pop().unwrap();
        assert_eq!(
            last,
            record(8, true, 5),
            "the new record took the next free number"
        );
    }

    #[test]
    fn a_store_left_by_the_previous_release_is_read_and_continued() {
        // The version-1 layout: every record a single value under [priority][seq], the next
        // sequence number under META_NEXT_SEQ, no format marker. Written here with sled
        // directly, as that release did.
        let dir = tempfile::tempdir().unwrap();
        let s = settings(1 << 20, FullPolicy::DropOldestTelemetry);
        let old: Vec<Record> = (0..6).map(|i| record(i, i % 3 == 0, 5)).collect();
        {
            let db = open_db(dir.path(), &s).unwrap();
            let tree = db.open_tree("outbox").unwrap();
            for (i, r) in old.iter().enumerate() {
                tree.insert(key(r.priority(), i as u64), r.encode().unwrap())
                    .unwrap();
            }
            tree.insert(META_NEXT_SEQ, &6u64.to_be_bytes()[..]).unwrap();
            db.flush().unwrap();
        }
        let m = Arc::new(Metrics::default());
        let (ob, report) = Outbox::open(dir.path(), s, m.clone()).unwrap();
        assert_eq!(report.records, 6);
        assert_eq!(ob.bytes(), old.iter().map(size).sum::<u64>());
        let high: Vec<(u64, Record)> = all(&ob, Priority::High);
        assert_eq!(high, vec![(0, old[0].clone()), (3, old[3].clone())]);
        ob.append(&[record(6, false, 5), record(7, false, 5)])
            .unwrap();
        let low: Vec<u64> = all(&ob, Priority::Low)
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(low, vec![1, 2, 4, 5, 6, 7]);
        // Old single values and new segments are acknowledged alike.
        let keys: Vec<Key> = [1, 2, 4, 5, 6].map(|s| key(Priority::Low, s)).to_vec();
        assert_eq!(ob.remove(&keys).unwrap(), 5);
        assert_eq!(ob.depth(), 3);
        assert_eq!(m.snapshot().outbox_corrupt, 0);
        assert_eq!(
            ob.inner.tree.get(META_FORMAT).unwrap().unwrap().as_ref(),
            &[SEGMENT_VERSION]
        );
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

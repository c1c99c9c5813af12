//! The durable outbox: every record bound for the cloud waits here until the cloud broker has
//! acknowledged it.
//!
//! Guarantees (each proven by a test named in ARCHITECTURE.md):
//! - **Accepted means on disk.** With `durability = "batch"` (the default) [`Outbox::flush`] is
//!   awaited after every appended batch and before anything is acknowledged to the producer.
//!   sled's `insert` alone is durable only after its next background flush.
//! - **Nothing leaves before its PUBACK.** Records are removed only by [`Outbox::remove`], which
//!   the uplink calls with the keys of a publish the broker acknowledged.
//! - **Order.** Keys are `[priority][sequence: u64 big-endian]`, so a scan yields each priority in
//!   the order records were appended. Sequence numbers are unique and increase for the life of
//!   the store (the next one is persisted with every batch), so the cloud can spot duplicates.
//! - **Bounded.** Stored bytes (keys + values, as counted here) never exceed `max_bytes`: when a
//!   batch does not fit, the full-policy either drops the oldest low-priority records first
//!   (alerts only when no telemetry is left) or refuses the new records. Every drop is counted.
//!   sled's files are larger than the counted bytes; ARCHITECTURE.md documents the margin.
//! - **Corruption is skipped, not fatal.** A record that fails its checksum is removed, logged and
//!   counted; a store that cannot be opened is moved aside and a fresh one is started.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

use crate::config::{Durability, FullPolicy, OutboxConfig};
use crate::metrics::Metrics;
use crate::record::{Priority, Record};

/// Key of a stored record: priority byte then big-endian sequence number.
pub type Key = [u8; 9];
const META_NEXT_SEQ: &[u8] = &[0xFF, b'n'];

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// The storage engine failed (I/O error, disk full). The batch was not stored: do not
    /// acknowledge its inputs; retry later.
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
}

impl From<&OutboxConfig> for OutboxSettings {
    fn from(c: &OutboxConfig) -> Self {
        Self {
            max_bytes: c.max_bytes,
            cache_bytes: c.cache_bytes,
            durability: c.durability,
            flush_interval_ms: c.flush_interval_ms,
            full_policy: c.full_policy,
        }
    }
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
    /// Serialises appends (sequence assignment and making room).
    append_lock: Mutex<u64>,
    bytes: AtomicU64,
    depth: AtomicU64,
    metrics: Arc<Metrics>,
    appended: Notify,
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

impl Outbox {
    /// Opens the outbox in `dir`, or, if the store there is broken, moves it aside and starts
    /// a fresh one (reported in [`OpenReport::moved_aside`]).
    pub fn open(
        dir: &Path,
        settings: OutboxSettings,
        metrics: Arc<Metrics>,
    ) -> Result<(Outbox, OpenReport), OutboxError> {
        let mut report = OpenReport::default();
        let db = match open_db(dir, &settings) {
            Ok(db) => db,
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
        for item in tree.iter() {
            let (k, v) = item?;
            if k.as_ref() == META_NEXT_SEQ {
                continue;
            }
            if let Some(s) = seq_of(&k) {
                next_seq = next_seq.max(s + 1);
            }
            bytes += (k.len() + v.len()) as u64;
            depth += 1;
        }
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
        };
        Ok((
            Outbox {
                inner: Arc::new(inner),
            },
            report,
        ))
    }

    /// Stores `records` in one atomic batch, assigning their sequence numbers, making room
    /// or refusing by the full-policy. Not durable until [`Outbox::flush`] returns.
    pub fn append(&self, records: &[Record]) -> Result<AppendOutcome, OutboxError> {
        let inner = &*self.inner;
        let mut outcome = AppendOutcome::default();
        let mut encoded: Vec<(Priority, Vec<u8>)> = Vec::with_capacity(records.len());
        for r in records {
            encoded.push((r.priority(), r.encode()?));
        }
        let mut next_seq = inner.append_lock.lock().unwrap_or_else(|p| p.into_inner());
        let max = inner.settings.max_bytes;
        // A record larger than the whole cap can never be stored.
        encoded.retain(|(_, v)| {
            let fits = (v.len() + 9) as u64 <= max;
            if !fits {
                outcome.refused += 1;
            }
            fits
        });
        let need: u64 = encoded.iter().map(|(_, v)| (v.len() + 9) as u64).sum();
        if inner.bytes.load(Ordering::Acquire) + need > max {
            match inner.settings.full_policy {
                FullPolicy::DropOldestTelemetry => {
                    outcome.dropped_old = self.make_room(need)?;
                }
                FullPolicy::RefuseNew => {
                    // Keep the prefix that fits: the batch's order is preserved.
                    let mut room = max.saturating_sub(inner.bytes.load(Ordering::Acquire));
                    let before = encoded.len();
                    let mut keep = 0;
                    for (_, v) in &encoded {
                        let n = (v.len() + 9) as u64;
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
        let mut batch = sled::Batch::default();
        let mut added = 0u64;
        for (prio, v) in &encoded {
            let k = key(*prio, *next_seq);
            *next_seq += 1;
            added += (v.len() + 9) as u64;
            batch.insert(&k[..], v.as_slice());
        }
        batch.insert(META_NEXT_SEQ, &next_seq.to_be_bytes()[..]);
        inner.tree.apply_batch(batch)?;
        outcome.stored = encoded.len();
        let bytes = inner.bytes.fetch_add(added, Ordering::AcqRel) + added;
        let depth = inner
            .depth
            .fetch_add(encoded.len() as u64, Ordering::AcqRel)
            + encoded.len() as u64;
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

    /// Drops oldest low-priority records, then oldest high-priority ones, until `need` more
    /// bytes fit. Returns how many were dropped.
    fn make_room(&self, need: u64) -> Result<usize, OutboxError> {
        let inner = &*self.inner;
        let max = inner.settings.max_bytes;
        let mut dropped = 0;
        for prio in [Priority::Low, Priority::High] {
            while inner.bytes.load(Ordering::Acquire) + need > max {
                let Some(item) = inner.tree.scan_prefix([prio as u8]).next() else {
                    break;
                };
                let (k, _) = item?;
                if let Some(old) = inner.tree.remove(&k)? {
                    inner
                        .bytes
                        .fetch_sub((k.len() + old.len()) as u64, Ordering::AcqRel);
                    inner.depth.fetch_sub(1, Ordering::AcqRel);
                    dropped += 1;
                }
            }
        }
        Ok(dropped)
    }

    /// Makes everything appended so far durable.
    pub async fn flush(&self) -> Result<(), OutboxError> {
        self.inner.db.flush_async().await?;
        Metrics::inc(&self.inner.metrics.outbox_flushes);
        Ok(())
    }

    /// Whether producers must await [`Outbox::flush`] before acknowledging their inputs.
    pub fn flush_per_batch(&self) -> bool {
        self.inner.settings.durability == Durability::Batch
    }

    /// Reads up to `max` records of `priority` with sequence numbers after `after`, in order.
    /// Corrupt records are removed and counted, and reading goes on past them.
    pub fn read_after(
        &self,
        priority: Priority,
        after: Option<u64>,
        max: usize,
        out: &mut Vec<Stored>,
    ) -> Result<(), OutboxError> {
        let start = match after {
            Some(s) => match s.checked_add(1) {
                Some(n) => key(priority, n),
                None => return Ok(()),
            },
            None => key(priority, 0),
        };
        let end = key(priority, u64::MAX);
        for item in self.inner.tree.range(start..=end) {
            if out.len() >= max {
                break;
            }
            let (k, v) = item?;
            let Ok(key_arr) = <Key>::try_from(k.as_ref()) else {
                continue;
            };
            let seq = seq_of(&k).unwrap_or(0);
            match Record::decode(&v) {
                Ok(record) => out.push(Stored {
                    key: key_arr,
                    seq,
                    record,
                    size: k.len() + v.len(),
                }),
                Err(e) => {
                    tracing::error!(seq, error = %e, "corrupt outbox record skipped");
                    Metrics::inc(&self.inner.metrics.outbox_corrupt);
                    self.remove(&[key_arr])?;
                }
            }
        }
        Ok(())
    }

    /// Counts up to `max` records of `priority` after `after` without decoding them.
    pub fn count_after(
        &self,
        priority: Priority,
        after: Option<u64>,
        max: usize,
    ) -> Result<usize, OutboxError> {
        let start = match after {
            Some(s) => match s.checked_add(1) {
                Some(n) => key(priority, n),
                None => return Ok(0),
            },
            None => key(priority, 0),
        };
        let end = key(priority, u64::MAX);
        let mut n = 0;
        for item in self.inner.tree.range(start..=end).take(max) {
            item?;
            n += 1;
        }
        Ok(n)
    }

    /// Removes acknowledged records. Keys already gone (dropped by the full-policy while in
    /// flight) are ignored. Returns how many were removed.
    pub fn remove(&self, keys: &[Key]) -> Result<usize, OutboxError> {
        let inner = &*self.inner;
        let mut removed = 0;
        let mut freed = 0u64;
        for k in keys {
            if let Some(old) = inner.tree.remove(k)? {
                removed += 1;
                freed += (k.len() + old.len()) as u64;
            }
        }
        let bytes = inner
            .bytes
            .fetch_sub(freed, Ordering::AcqRel)
            .saturating_sub(freed);
        let depth = inner
            .depth
            .fetch_sub(removed as u64, Ordering::AcqRel)
            .saturating_sub(removed as u64);
        Metrics::set(&inner.metrics.outbox_bytes, bytes);
        Metrics::set(&inner.metrics.outbox_depth, depth);
        Ok(removed)
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

fn aside_path(dir: &Path) -> PathBuf {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".broken-{stamp}"));
    dir.with_file_name(name)
}

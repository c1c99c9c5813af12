//! Reading the sled store of earlier releases, to migrate its backlog into the segment log.
//!
//! That store is one sled tree, `outbox`, keyed `[priority: u8][seq: u64 BE]`, whose values
//! are either single records or packed segments (`record.rs`), with the next sequence number
//! under `[0xFF, b'n']`. Its files (`conf`, `db`, `blobs/`, `snap.*`) sit in the outbox
//! directory itself.

use std::io;
use std::path::Path;

use crate::outbox::record::{Priority, Record, Segment, SEGMENT_VERSION, SINGLE_OVERHEAD};
use crate::telemetry::metrics::Metrics;

const META_NEXT_SEQ: &[u8] = &[0xFF, b'n'];

/// Whether `dir` holds a sled store.
pub fn present(dir: &Path) -> bool {
    dir.join("db").is_file() || dir.join("conf").is_file()
}

/// Hands every intact record of the sled store in `dir` to `f` as (priority, seq, append
/// time, postcard body), each priority in sequence order; damaged values are counted in
/// `outbox_corrupt` and skipped. Returns the next sequence number the store would have used.
pub fn read(
    dir: &Path,
    metrics: &Metrics,
    mut f: impl FnMut(Priority, u64, u64, &[u8]) -> io::Result<()>,
) -> io::Result<u64> {
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(4 << 20)
        .mode(sled::Mode::LowSpace)
        .open()
        .map_err(|e| {
            // Held by another process (an old agent still running): not broken, so never
            // moved aside; opening waits and fails instead.
            if e.to_string().contains("could not acquire lock") {
                io::Error::new(io::ErrorKind::WouldBlock, e.to_string())
            } else {
                io::Error::other(e)
            }
        })?;
    let tree = db.open_tree("outbox").map_err(io::Error::other)?;
    let mut next = match tree.get(META_NEXT_SEQ).map_err(io::Error::other)? {
        Some(v) if v.len() == 8 => u64::from_be_bytes(v.as_ref().try_into().unwrap_or([0; 8])),
        _ => 0,
    };
    // Single values carry no append time: they count as appended now.
    let now = crate::outbox::record::now_secs();
    for item in tree.iter() {
        let (k, v) = item.map_err(io::Error::other)?;
        let prio = match k.first() {
            Some(0) => Priority::High,
            Some(1) => Priority::Low,
            _ => continue,
        };
        let Some(base) = k
            .get(1..9)
            .filter(|_| k.len() == 9)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_be_bytes)
        else {
            continue;
        };
        if v.first() == Some(&SEGMENT_VERSION) {
            match Segment::parse(base, &v, true) {
                Ok(seg) => {
                    for e in &seg.entries {
                        f(prio, e.seq, seg.appended_at, &v[e.body.clone()])?;
                        next = next.max(e.seq + 1);
                    }
                }
                Err(e) => {
                    tracing::error!(seq = base, error = %e, "corrupt value of the old outbox skipped in migration");
                    Metrics::inc(&metrics.outbox_corrupt);
                }
            }
        } else {
            match Record::decode(&v) {
                Ok(_) => {
                    f(prio, base, now, &v[SINGLE_OVERHEAD..])?;
                    next = next.max(base + 1);
                }
                Err(e) => {
                    tracing::error!(seq = base, error = %e, "corrupt value of the old outbox skipped in migration");
                    Metrics::inc(&metrics.outbox_corrupt);
                }
            }
        }
    }
    Ok(next)
}

/// Deletes the sled store's files from `dir`.
pub fn delete(dir: &Path) -> io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name == "blobs" {
            std::fs::remove_dir_all(e.path())?;
        } else if name == "db" || name == "conf" || name.starts_with("snap.") {
            std::fs::remove_file(e.path())?;
        }
    }
    Ok(())
}

//! The persisted command table: every accepted, unfinished command and the ids of recently
//! finished ones, in one small JSON file replaced atomically (`durable_file`) at the end of
//! each router turn that changed it.
//!
//! Commands are rare and few ([`super::config::MAX_PENDING_LIMIT`] at most, 256 by default),
//! so rewriting the whole table costs one small write and two fsyncs per turn, and needs no
//! second database beside the outbox.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use edgestream_protocol::types::{Command, OutcomeState};
use serde::{Deserialize, Serialize};

/// Finished command ids remembered to refuse a reused id and recognise a late reply.
pub const DEDUPE_WINDOW: usize = 1024;
const FILE: &str = "state.json";
/// Version of the file's layout.
const FORMAT: u32 = 1;

/// Who issued a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Origin {
    Cloud,
    /// The rule's name.
    Rule(String),
}

/// How far a command got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Stage {
    /// Accepted, not yet handed to a transport.
    Queued,
    /// Handed to a transport at `at_ms` (recorded before the hand-off, so a crash right after
    /// never sends it twice). `via` is `mqtt` or the serial port's path.
    Sent { at_ms: u64, via: String },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pending {
    pub command: Command,
    pub origin: Origin,
    pub stage: Stage,
    /// Hash of the command as received, to tell a redelivery from a reused id.
    pub fingerprint: u32,
    /// Whether the `accepted` outcome is in the outbox (else it is sent again after a crash).
    pub reported: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finished {
    pub id: String,
    pub device: String,
    pub fingerprint: u32,
    pub state: OutcomeState,
    pub detail: String,
    pub at_ms: u64,
    /// Whether the final outcome is in the outbox (else it is sent again after a crash).
    pub reported: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Table {
    pub pending: Vec<Pending>,
    pub recent: VecDeque<Finished>,
}

#[derive(Deserialize)]
struct OnDisk {
    format: u32,
    #[serde(flatten)]
    table: Table,
}

/// [`OnDisk`] as written: borrows the table instead of copying it on every save.
#[derive(Serialize)]
struct OnDiskRef<'a> {
    format: u32,
    #[serde(flatten)]
    table: &'a Table,
}

impl Table {
    pub fn pending(&self, id: &str) -> Option<&Pending> {
        self.pending.iter().find(|p| p.command.id.as_str() == id)
    }

    pub fn finished(&self, id: &str) -> Option<&Finished> {
        self.recent.iter().rev().find(|f| f.id == id)
    }

    /// Moves a pending command to the finished list (dropping the oldest past the window).
    pub fn finish(&mut self, id: &str, state: OutcomeState, detail: &str, at_ms: u64) {
        let Some(i) = self
            .pending
            .iter()
            .position(|p| p.command.id.as_str() == id)
        else {
            return;
        };
        let p = self.pending.remove(i);
        self.remember(Finished {
            id: p.command.id.to_string(),
            device: p.command.device.to_string(),
            fingerprint: p.fingerprint,
            state,
            detail: detail.to_string(),
            at_ms,
            reported: false,
        });
    }

    pub fn remember(&mut self, f: Finished) {
        if self.recent.len() >= DEDUPE_WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(f);
    }
}

/// The file behind the table.
#[derive(Debug, Clone)]
pub struct CommandStore {
    dir: PathBuf,
}

impl CommandStore {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("commands"),
        }
    }

    /// The persisted table; empty when there is none.
    pub fn load(&self) -> std::io::Result<Table> {
        let Some(bytes) = crate::durable_file::read(&self.dir, FILE)? else {
            return Ok(Table::default());
        };
        let on_disk: OnDisk = serde_json::from_slice(&bytes)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        if on_disk.format != FORMAT {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("unknown command table format {}", on_disk.format),
            ));
        }
        Ok(on_disk.table)
    }

    /// The table's bytes, made on the router's task (cheap) so that the blocking write can
    /// run elsewhere.
    pub fn encode(table: &Table) -> std::io::Result<Vec<u8>> {
        serde_json::to_vec(&OnDiskRef {
            format: FORMAT,
            table,
        })
        .map_err(std::io::Error::other)
    }

    pub fn write(&self, bytes: &[u8]) -> std::io::Result<()> {
        crate::durable_file::replace(&self.dir, FILE, bytes)
    }

    /// Moves an unreadable file aside so that the agent starts with an empty table (and says
    /// so) instead of refusing to start.
    pub fn move_aside(&self) -> std::io::Result<PathBuf> {
        let to = self.dir.join(format!(
            "{FILE}.unreadable-{}",
            crate::source::reading::now_ms()
        ));
        std::fs::rename(self.dir.join(FILE), &to)?;
        Ok(to)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_round_trips_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = CommandStore::new(dir.path());
        assert_eq!(store.load().unwrap(), Table::default());
        let command = edgestream_protocol::json::decode_command(
            br#"{"v":1,"id":"c-1","device":"valve-1","name":"set_position","args":{"percent":40,"f":1.5,"on":true,"m":"auto"},"issued_at":1,"expires_at":2}"#,
        )
        .unwrap();
        let mut table = Table::default();
        table.pending.push(Pending {
            command,
            origin: Origin::Rule("hot".into()),
            stage: Stage::Sent {
                at_ms: 5,
                via: "mqtt".into(),
            },
            fingerprint: 7,
            reported: true,
        });
        table.remember(Finished {
            id: "c-0".into(),
            device: "valve-1".into(),
            fingerprint: 3,
            state: OutcomeState::TimedOut,
            detail: "no reply".into(),
            at_ms: 9,
            reported: false,
        });
        store.write(&CommandStore::encode(&table).unwrap()).unwrap();
        assert_eq!(store.load().unwrap(), table);
    }

    #[test]
    fn the_window_keeps_the_newest_ids() {
        let mut t = Table::default();
        for i in 0..DEDUPE_WINDOW + 5 {
            t.remember(Finished {
                id: format!("c-{i}"),
                device: "d".into(),
                fingerprint: 0,
                state: OutcomeState::Succeeded,
                detail: String::new(),
                at_ms: 0,
                reported: true,
            });
        }
        assert_eq!(t.recent.len(), DEDUPE_WINDOW);
        assert!(t.finished("c-4").is_none());
        assert!(t.finished("c-5").is_some());
    }
}

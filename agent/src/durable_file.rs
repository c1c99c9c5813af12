//! Small state files that must survive a crash or power cut whole: written to a temporary
//! file, fsynced, renamed over the old one, and the directory fsynced, so that a reader after
//! a crash at any point sees either the old content or the new, never a torn mix.

use std::io::Write;
use std::path::Path;

/// Atomically replaces `dir/name` with `bytes` (creating `dir` if needed).
pub fn replace(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{name}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

/// The content of `dir/name`, or `None` if it does not exist.
pub fn read(dir: &Path, name: &str) -> std::io::Result<Option<Vec<u8>>> {
    match std::fs::read(dir.join(name)) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("state");
        assert_eq!(super::read(&sub, "f.json").unwrap(), None);
        super::replace(&sub, "f.json", b"one").unwrap();
        super::replace(&sub, "f.json", b"two").unwrap();
        assert_eq!(
            super::read(&sub, "f.json").unwrap().as_deref(),
            Some(&b"two"[..])
        );
        assert!(!sub.join("f.json.tmp").exists());
    }
}

//! A LazyFS mount for the power-cut tests (tests/lazyfs/README.md): files written under the
//! mount point stay in LazyFS's own cache until they are fsynced, and [`LazyFs::power_cut`]
//! drops whatever was not, as losing power would.
//!
//! The LazyFS binary is `$LAZYFS_BIN` when set (scripts/test sets it), otherwise whatever
//! `tests/lazyfs/build.sh` prints: it builds LazyFS on first use (into `$LAZYFS_PREFIX`, by
//! default /var/cache/lazyfs) and returns at once when it is built. Nothing here skips: a
//! machine that cannot mount LazyFS fails the test with the reason.
#![allow(dead_code)] // each power-cut test uses a different part

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Linux's `O_NONBLOCK` (the same value on x86_64, aarch64 and arm).
const O_NONBLOCK: i32 = 0o4000;
/// Longest a `clear-cache` may take before the test fails.
const CLEAR_TIMEOUT: Duration = Duration::from_secs(30);

/// The LazyFS kit in the repository.
pub fn kit_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/lazyfs")
}

/// The LazyFS binary, built on first use; panics with the reason when there is none.
pub fn binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("LAZYFS_BIN") {
            let p = PathBuf::from(p);
            assert!(
                p.is_file(),
                "LAZYFS_BIN={} is not a file: build LazyFS with tests/lazyfs/build.sh",
                p.display()
            );
            return p;
        }
        let build = kit_dir().join("build.sh");
        let out = Command::new(&build)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", build.display()));
        assert!(
            out.status.success(),
            "{} failed ({}); the power-cut tests need LazyFS (root, apt-get, /dev/fuse):\n{}",
            build.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let bin = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
        assert!(
            bin.is_file(),
            "{} printed no LazyFS binary:\n{stdout}",
            build.display()
        );
        bin
    })
    .clone()
}

/// One mounted LazyFS. Unmounted on drop: keep it alive longer than any process with files
/// open under it, and drop it before the directory that holds it.
pub struct LazyFs {
    pub mnt: PathBuf,
    /// Where the data lands (what survives a cut).
    pub root: PathBuf,
    fifo: PathBuf,
    /// The completion FIFO, held open for reading for the life of the mount: LazyFS reads no
    /// command until a reader has it open, and drops its notice when none has.
    completed: File,
    cache_size: String,
    mounted: bool,
}

impl LazyFs {
    /// Mounts LazyFS at `base/m`, storing into `base/r`, with its FIFOs in `base`. Short names:
    /// a fault command names a file by its path under `r` and must fit in 99 bytes.
    /// `cache_size` (e.g. "512mb") must exceed the data written between two cuts: when the
    /// cache is full LazyFS writes straight through, and the test would under-report loss.
    pub fn mount(base: &Path, cache_size: &str) -> LazyFs {
        assert!(
            Path::new("/dev/fuse").exists(),
            "/dev/fuse is missing: the power-cut tests need FUSE"
        );
        let bin = binary();
        let fifo = base.join("faults.fifo");
        let completed_path = base.join("faults.fifo.completed");
        let mut fs = LazyFs {
            mnt: base.join("m"),
            root: base.join("r"),
            fifo,
            // Replaced by `mount_now` once the FIFO exists.
            completed: File::open("/dev/null").expect("open /dev/null"),
            cache_size: cache_size.to_string(),
            mounted: false,
        };
        fs.mount_now(&bin);
        fs.completed = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(O_NONBLOCK)
            .open(&completed_path)
            .unwrap_or_else(|e| panic!("open {}: {e}", completed_path.display()));
        fs
    }

    fn mount_now(&mut self, bin: &Path) {
        let out = Command::new(kit_dir().join("mount.sh"))
            .arg(&self.mnt)
            .arg(&self.root)
            .arg(&self.fifo)
            .env("LAZYFS_BIN", bin)
            .env("LAZYFS_CACHE_SIZE", &self.cache_size)
            .output()
            .expect("run tests/lazyfs/mount.sh");
        assert!(
            out.status.success(),
            "LazyFS did not mount {}: {}",
            self.mnt.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        self.mounted = true;
    }

    /// The pid of the LazyFS process.
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.fifo.with_extension("fifo.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// Whether the LazyFS process is alive (a torn-write fault makes it kill itself).
    pub fn is_alive(&self) -> bool {
        self.pid()
            .is_some_and(|p| Path::new(&format!("/proc/{p}")).exists() && !is_zombie(p))
    }

    /// Sends one command on the faults FIFO (one write, one newline, as LazyFS requires);
    /// false when LazyFS is gone (nothing reads the FIFO).
    pub fn send(&self, command: &str) -> bool {
        // LazyFS reads commands in 100-byte chunks and drops the last byte (the newline).
        assert!(
            command.len() < 100 && !command.contains('\n'),
            "LazyFS command too long (at most 99 bytes): {command:?}"
        );
        // Non-blocking: with no reader the open fails (ENXIO) instead of waiting forever.
        let mut f = match OpenOptions::new()
            .write(true)
            .custom_flags(O_NONBLOCK)
            .open(&self.fifo)
        {
            Ok(f) => f,
            Err(_) if !self.is_alive() => return false,
            Err(e) => panic!("open {}: {e}", self.fifo.display()),
        };
        // Under PIPE_BUF bytes: written whole, at once.
        f.write_all(format!("{command}\n").as_bytes())
            .unwrap_or_else(|e| panic!("write {command:?} to the LazyFS FIFO: {e}"));
        true
    }

    /// The power cut: drops every write not fsynced, and returns once LazyFS says it is done.
    /// Kill the program under test first (a process that keeps a file open can still read
    /// dropped pages from the kernel's cache).
    pub fn power_cut(&mut self) {
        // A notice left over from an earlier command must not be taken for this one's.
        let mut junk = [0u8; 256];
        while matches!(self.completed.read(&mut junk), Ok(n) if n > 0) {}
        assert!(
            self.send("lazyfs::clear-cache"),
            "LazyFS is not running; its log:\n{}",
            self.log_tail()
        );
        let deadline = Instant::now() + CLEAR_TIMEOUT;
        let mut got = String::new();
        loop {
            let mut buf = [0u8; 256];
            match self.completed.read(&mut buf) {
                Ok(n) if n > 0 => {
                    got.push_str(&String::from_utf8_lossy(&buf[..n]));
                    if got.contains("finished::clear-cache") {
                        return;
                    }
                }
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "LazyFS did not finish clear-cache within {CLEAR_TIMEOUT:?} (got {got:?}); \
                 its log:\n{}",
                self.log_tail()
            );
            assert!(
                self.is_alive(),
                "LazyFS died during clear-cache; its log:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The share of LazyFS's cache in use, in percent. When it is full, writes go straight
    /// to the root directory and survive a cut, so a test must stay well below it.
    pub fn cache_usage(&self) -> f64 {
        const NEEDLE: &str = "cache usage (%pages) is ";
        let count = |text: &str| text.matches(NEEDLE).count();
        let logs = || {
            ["fifo.log", "fifo.out"]
                .iter()
                .map(|e| std::fs::read_to_string(self.fifo.with_extension(e)).unwrap_or_default())
                .collect::<String>()
        };
        let before = count(&logs());
        assert!(
            self.send("lazyfs::display-cache-usage"),
            "LazyFS is not running"
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let text = logs();
            if count(&text) > before {
                let at = text.rfind(NEEDLE).unwrap() + NEEDLE.len();
                return text[at..]
                    .split('%')
                    .next()
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or_else(|| panic!("unreadable cache usage: {}", &text[at..]));
            }
            assert!(
                Instant::now() < deadline,
                "LazyFS did not report its cache usage; its log:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Unmounts (dropping the cache: also a power cut) and mounts again on the same root,
    /// with no fault configured. Used after LazyFS killed itself on a torn write.
    pub fn remount(&mut self) {
        self.unmount();
        self.mount_now(&binary());
    }

    /// Unmounts; no process may have files open under the mount point.
    pub fn unmount(&mut self) {
        if !self.mounted {
            return;
        }
        let out = Command::new(kit_dir().join("umount.sh"))
            .arg(&self.mnt)
            .output()
            .expect("run tests/lazyfs/umount.sh");
        assert!(
            out.status.success(),
            "LazyFS did not unmount {}: {}",
            self.mnt.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        self.mounted = false;
    }

    /// The end of LazyFS's log and output, for failure messages.
    pub fn log_tail(&self) -> String {
        let mut s = String::new();
        for ext in ["fifo.log", "fifo.out"] {
            let p = self.fifo.with_extension(ext);
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(20);
            s.push_str(&format!(
                "--- {}\n{}\n",
                p.display(),
                lines[from..].join("\n")
            ));
        }
        s
    }

    /// Everything LazyFS logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.fifo.with_extension("fifo.log")).unwrap_or_default()
    }

    /// The path LazyFS uses for a file under the mount point in its fault commands: the file's
    /// path under the root directory.
    pub fn fault_path(&self, under_mnt: &Path) -> PathBuf {
        self.root
            .join(under_mnt.strip_prefix(&self.mnt).unwrap_or(under_mnt))
    }
}

impl Drop for LazyFs {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new(kit_dir().join("umount.sh"))
                .arg(&self.mnt)
                .output();
        }
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Regular files under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => out.extend(files_under(&e.path())),
                Ok(t) if t.is_file() => out.push(e.path()),
                _ => {}
            }
        }
    }
    out.sort();
    out
}

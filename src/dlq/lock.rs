//! The lock that keeps two `dlq redrive` runs off one dead-letter file: `<file>.lock`,
//! created with `create_new` (so exactly one process can create it), holding the owner's
//! pid, and removed when the redrive ends.
//!
//! A redrive that was killed leaves its lock behind. Such a lock is never taken over
//! silently — a pid can be reused, and two redrives of one file would replay its letters
//! twice — but reported: when the pid is known not to be running (Linux: no
//! `/proc/<pid>`), the error says the lock is stale and how to remove it.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Why the lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock, or whether it still runs cannot be told.
    #[error("{lock} is held by another redrive (pid {holder}); wait for it to finish (if no redrive is running, remove the file)")]
    Held {
        /// The lock file's path.
        lock: String,
        /// The pid written in the lock file, or `unknown` when it is empty or unreadable.
        holder: String,
    },
    /// The lock was left by a process that is no longer running; it is not taken over
    /// (a pid can be reused), only reported.
    #[error("{lock} was left by pid {holder}, which is no longer running (a redrive that was killed?); if no redrive is running, remove it: rm {lock}")]
    Stale {
        /// The lock file's path.
        lock: String,
        /// The pid written in the lock file.
        holder: String,
    },
    /// The lock file could not be created or its pid written.
    #[error("cannot create {lock}: {source}")]
    Io {
        /// The lock file's path.
        lock: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// A held redrive lock; its file is removed when dropped.
#[derive(Debug)]
pub struct RedriveLock {
    path: PathBuf,
}

/// The lock file for dead-letter file `file`.
pub fn lock_path(file: &Path) -> PathBuf {
    let mut name = file.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

impl RedriveLock {
    /// Takes the lock for dead-letter file `file`, or says who holds it. Never waits.
    pub fn acquire(file: &Path) -> Result<RedriveLock, LockError> {
        let path = lock_path(file);
        let lock = path.display().to_string();
        let created = OpenOptions::new().write(true).create_new(true).open(&path);
        let mut held = match created {
            Ok(held) => held,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let holder = std::fs::read_to_string(&path)
                    .ok()
                    .map(|pid| pid.trim().to_owned())
                    .filter(|pid| !pid.is_empty())
                    .unwrap_or_else(|| "unknown".to_owned());
                return Err(match holder.parse::<u32>().ok().map(is_running) {
                    Some(Some(false)) => LockError::Stale { lock, holder },
                    _ => LockError::Held { lock, holder },
                });
            }
            Err(source) => return Err(LockError::Io { lock, source }),
        };
        // From here the file is ours: remove it if writing the pid fails.
        let taken = RedriveLock { path };
        writeln!(held, "{}", std::process::id())
            .and_then(|()| held.sync_all())
            .map_err(|source| LockError::Io { lock, source })?;
        Ok(taken)
    }

    /// The lock file's path (`<file>.lock`).
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Whether process `pid` exists: `None` where that cannot be told.
fn is_running(pid: u32) -> Option<bool> {
    let proc = Path::new("/proc");
    if cfg!(target_os = "linux") && proc.join("self").exists() {
        Some(proc.join(pid.to_string()).exists())
    } else {
        None
    }
}

impl Drop for RedriveLock {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            eprintln!("warning: cannot remove {}: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("dlq.jsonl");
        let held = RedriveLock::acquire(&file).unwrap();
        assert_eq!(held.path(), dir.path().join("dlq.jsonl.lock"));
        let err = RedriveLock::acquire(&file).unwrap_err();
        assert!(matches!(err, LockError::Held { .. }), "{err}");
        assert!(
            err.to_string().contains(&std::process::id().to_string()),
            "names the holder: {err}"
        );
        drop(held);
        assert!(
            !dir.path().join("dlq.jsonl.lock").exists(),
            "removed on release"
        );
        RedriveLock::acquire(&file).expect("free again once released");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_lock_left_by_a_dead_process_is_reported_as_stale_not_taken() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("dlq.jsonl");
        // Beyond Linux's pid_max (at most 2^22), so no process has it.
        std::fs::write(lock_path(&file), "99999999\n").unwrap();
        let err = RedriveLock::acquire(&file).unwrap_err();
        assert!(matches!(err, LockError::Stale { .. }), "{err}");
        assert!(err.to_string().contains("rm "), "says how: {err}");
        assert_eq!(
            std::fs::read_to_string(lock_path(&file)).unwrap(),
            "99999999\n",
            "left as it was"
        );
    }
}

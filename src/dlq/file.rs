//! JSON-lines file sink.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use super::DeadLetter;

/// Appends letters to a file, one JSON object per line; flushed and fsynced per batch.
#[derive(Debug)]
pub struct FileSink {
    path: PathBuf,
    file: File,
    identity: Option<(u64, u64)>,
}

#[cfg(unix)]
fn identity(meta: &std::fs::Metadata) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    Some((meta.dev(), meta.ino()))
}

#[cfg(not(unix))]
fn identity(_meta: &std::fs::Metadata) -> Option<(u64, u64)> {
    None
}

impl FileSink {
    /// Opens (creating it and its directory) `path` for appending.
    pub fn open(path: &Path) -> std::io::Result<FileSink> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let identity = identity(&file.metadata()?);
        Ok(FileSink {
            path: path.to_owned(),
            file,
            identity,
        })
    }

    /// Reopens the path when the file we hold is no longer the one at the path
    /// (logrotate moved it, or someone deleted it).
    fn follow_rotation(&mut self) -> std::io::Result<()> {
        let current = std::fs::metadata(&self.path)
            .ok()
            .and_then(|m| identity(&m));
        if current.is_none() || current != self.identity {
            *self = FileSink::open(&self.path)?;
        }
        Ok(())
    }

    pub fn write(&mut self, letters: &[DeadLetter]) -> std::io::Result<()> {
        self.follow_rotation()?;
        let mut buf = Vec::with_capacity(letters.len() * 256);
        for letter in letters {
            serde_json::to_writer(&mut buf, letter)?;
            buf.push(b'\n');
        }
        self.file.write_all(&buf)?;
        self.file.flush()?;
        self.file.sync_data()
    }
}

/// Reads a JSON-lines dead-letter file; a line that does not parse is an error naming it.
pub fn read_letters(path: &Path) -> Result<Vec<DeadLetter>, String> {
    let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut letters = Vec::new();
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let letter = serde_json::from_str(&line)
            .map_err(|e| format!("{} line {}: not a dead letter: {e}", path.display(), n + 1))?;
        letters.push(letter);
    }
    Ok(letters)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn letter(id: &str) -> DeadLetter {
        DeadLetter {
            id: id.to_owned(),
            route: "records".into(),
            function: "f".into(),
            key: "k".into(),
            record: RawValue::from_string(r#"{"n":1}"#.into()).unwrap(),
            error: "throttled".into(),
            error_kind: "CallerRateLimitExceeded".into(),
            possibly_processed: false,
            attempts: 5,
            first_attempt_at: "2026-01-01T00:00:00.000Z".into(),
            last_attempt_at: "2026-01-01T00:00:01.000Z".into(),
        }
    }

    #[test]
    fn appends_lines_and_reads_them_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/dlq.jsonl");
        let mut sink = FileSink::open(&path).unwrap();
        sink.write(&[letter("a"), letter("b")]).unwrap();
        sink.write(&[letter("c")]).unwrap();
        let ids: Vec<String> = read_letters(&path)
            .unwrap()
            .into_iter()
            .map(|l| l.id)
            .collect();
        assert_eq!(ids, ["a", "b", "c"]);
    }

    #[test]
    fn follows_rotation_to_a_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dlq.jsonl");
        let rotated = dir.path().join("dlq.jsonl.1");
        let mut sink = FileSink::open(&path).unwrap();
        sink.write(&[letter("before")]).unwrap();
        std::fs::rename(&path, &rotated).unwrap();
        sink.write(&[letter("after")]).unwrap();
        assert_eq!(read_letters(&rotated).unwrap()[0].id, "before");
        let fresh = read_letters(&path).unwrap();
        assert_eq!(fresh.len(), 1);
        assert_eq!(fresh[0].id, "after");
    }

    #[test]
    fn a_garbled_line_is_reported_with_its_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dlq.jsonl");
        std::fs::write(&path, "{\"id\":1}\n").unwrap();
        assert!(read_letters(&path).unwrap_err().contains("line 1"));
    }
}

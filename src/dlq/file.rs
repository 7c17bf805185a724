//! JSON-lines file sink.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::DeadLetter;

/// Appends letters to a file, one JSON object per line; flushed and fsynced per batch.
/// Blocking: use it from a thread of its own (the sink's writer), not on the runtime.
#[derive(Debug)]
pub struct FileSink {
    path: PathBuf,
    file: File,
    identity: Option<(u64, u64)>,
    /// The file may end mid-line (just opened, or the last write failed).
    torn: bool,
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
        let created = !path.exists();
        // Read access only to look at the last byte (see `start_on_a_fresh_line`); every
        // write appends, wherever the read position is.
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)?;
        if created {
            sync_parent(path);
        }
        let identity = identity(&file.metadata()?);
        let mut sink = FileSink {
            path: path.to_owned(),
            file,
            identity,
            torn: true,
        };
        sink.start_on_a_fresh_line()?;
        Ok(sink)
    }

    /// The file's path as configured; the sink reopens this path when the file was rotated.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A crash or a failed write may have left a partial last line. Appending straight
    /// after it would glue the next letter onto it and make both unreadable, so the
    /// partial line is ended first (readers then skip it as one torn line).
    fn start_on_a_fresh_line(&mut self) -> std::io::Result<()> {
        if !self.torn {
            return Ok(());
        }
        let len = self.file.metadata()?.len();
        if len > 0 {
            let mut last = [0u8; 1];
            self.file.seek(SeekFrom::End(-1))?;
            self.file.read_exact(&mut last)?;
            if last[0] != b'\n' {
                self.file.write_all(b"\n")?;
            }
        }
        self.torn = false;
        Ok(())
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

    /// Appends `letters` in one write, then flushes and fsyncs: when this returns `Ok`,
    /// every letter is on disk.
    pub fn write(&mut self, letters: &[DeadLetter]) -> std::io::Result<()> {
        let written = self.try_write(letters);
        // After a failure the file may end mid-line; look before the next append.
        self.torn |= written.is_err();
        written
    }

    fn try_write(&mut self, letters: &[DeadLetter]) -> std::io::Result<()> {
        self.follow_rotation()?;
        self.start_on_a_fresh_line()?;
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

/// Makes a new file's directory entry durable too, so an fsynced letter survives a crash
/// right after the file was created. Best effort: not every platform can open a directory.
fn sync_parent(path: &Path) {
    let dir = match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(dir) => dir,
        None => Path::new("."),
    };
    if let Ok(dir) = File::open(dir) {
        let _ = dir.sync_all();
    }
}

/// A line of a dead-letter file that is not a letter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SkippedLine {
    /// The line's number in the file, 1-based.
    pub line: usize,
    /// Why it is not a letter: the JSON error, or that it is not UTF-8.
    pub error: String,
    /// The line as it is in the file (without its newline), so it can be kept aside.
    pub text: Vec<u8>,
}

/// What a dead-letter file holds: the letters, and the lines that are not letters (a torn
/// last line after a crash mid-write, or anything else that does not parse).
#[derive(Debug, Default)]
pub struct LetterFile {
    /// The letters, in file order.
    pub letters: Vec<DeadLetter>,
    /// The lines that are not letters, in file order.
    pub skipped: Vec<SkippedLine>,
}

/// Reads a JSON-lines dead-letter file. Lines that do not parse (or are not UTF-8) are
/// skipped and returned with their numbers; only a file that cannot be read is an error.
pub fn read_letters(path: &Path) -> Result<LetterFile, String> {
    let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut reader = BufReader::new(file);
    let mut read = LetterFile::default();
    let mut line = Vec::new();
    for number in 1.. {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<DeadLetter>(&line) {
            Ok(letter) => read.letters.push(letter),
            Err(e) => read.skipped.push(SkippedLine {
                line: number,
                error: e.to_string(),
                text: line.clone(),
            }),
        }
    }
    Ok(read)
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
            .letters
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
        assert_eq!(read_letters(&rotated).unwrap().letters[0].id, "before");
        let fresh = read_letters(&path).unwrap().letters;
        assert_eq!(fresh.len(), 1);
        assert_eq!(fresh[0].id, "after");
    }

    fn line_of(l: &DeadLetter) -> String {
        serde_json::to_string(l).unwrap()
    }

    #[test]
    fn a_torn_last_line_is_skipped_and_reported_with_its_number() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dlq.jsonl");
        let torn = &line_of(&letter("c"))[..40];
        std::fs::write(
            &path,
            format!(
                "{}\n{}\n{torn}",
                line_of(&letter("a")),
                line_of(&letter("b"))
            ),
        )
        .unwrap();
        let read = read_letters(&path).unwrap();
        let ids: Vec<&str> = read.letters.iter().map(|l| l.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(read.skipped.len(), 1);
        assert_eq!(read.skipped[0].line, 3);
        assert_eq!(read.skipped[0].text, torn.as_bytes());
    }

    #[test]
    fn garbled_and_non_utf8_lines_in_the_middle_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dlq.jsonl");
        let mut text = format!("{}\n{{\"id\":1}}\n", line_of(&letter("a"))).into_bytes();
        text.extend_from_slice(b"\xff\xfe\n\n");
        text.extend_from_slice(line_of(&letter("d")).as_bytes());
        std::fs::write(&path, text).unwrap();
        let read = read_letters(&path).unwrap();
        let ids: Vec<&str> = read.letters.iter().map(|l| l.id.as_str()).collect();
        assert_eq!(
            ids,
            ["a", "d"],
            "a last line without its newline still counts"
        );
        let lines: Vec<usize> = read.skipped.iter().map(|s| s.line).collect();
        assert_eq!(lines, [2, 3]);
    }

    #[test]
    fn letters_appended_after_a_torn_line_start_on_a_line_of_their_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dlq.jsonl");
        std::fs::write(&path, format!("{}\n{{\"id\":\"tor", line_of(&letter("a")))).unwrap();
        let mut sink = FileSink::open(&path).unwrap();
        sink.write(&[letter("b")]).unwrap();
        let read = read_letters(&path).unwrap();
        let ids: Vec<&str> = read.letters.iter().map(|l| l.id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(read.skipped.len(), 1);
        assert_eq!(read.skipped[0].line, 2);
    }
}

//! The `sluicegate dlq` commands over dead-letter files (storage in [`crate::dlq`], the
//! replay in [`crate::redrive`]): `inspect` counts letters, `redrive`
//! replays them under a lock. Both skip lines that are not letters (a torn last line after a
//! crash mid-write, or anything else that does not parse) and report them by number
//! instead of rejecting the file; `redrive` keeps such lines in `<file>.unparsable`, so
//! rewriting the file loses nothing.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::config::Config;
use crate::dlq::lock::RedriveLock;
use crate::dlq::{read_letters, DeadLetter, FileSink, SkippedLine};
use crate::redrive;

/// `dlq inspect` with the config at `config`: prints the report on stdout.
pub fn inspect_command(config: &Path, from: Option<PathBuf>) -> Result<bool, String> {
    let config = Config::load(config).map_err(|e| e.to_string())?;
    Ok(inspect(&config, from)?.print())
}

/// `dlq redrive` with the config at `config`: prints the report on stdout; `Ok(false)` when
/// letters failed again.
pub async fn redrive_command(
    config: &Path,
    from: Option<PathBuf>,
    limits: RedriveLimits,
) -> Result<bool, String> {
    let config = Config::load(config).map_err(|e| e.to_string())?;
    Ok(redrive_files(config, from, limits).await?.print())
}

/// What a command prints (one JSON object on stdout) and whether it fully succeeded.
#[derive(Debug)]
pub struct Report {
    /// The command's result, printed as one JSON object on stdout.
    pub json: Value,
    /// Whether the command fully succeeded: `false` makes the process exit non-zero.
    pub ok: bool,
}

impl Report {
    /// Prints the JSON on stdout; returns whether the command fully succeeded.
    fn print(self) -> bool {
        println!("{}", self.json);
        self.ok
    }
}

/// The dead-letter files a `dlq` command reads: `--from`, or every route's `dlq.file`.
pub fn sources(config: &Config, from: Option<PathBuf>) -> Result<Vec<PathBuf>, String> {
    if let Some(from) = from {
        return Ok(vec![from]);
    }
    let mut files = Vec::new();
    for route in &config.routes {
        match &route.dlq {
            Some(dlq) if dlq.file.is_some() => files.extend(dlq.file.clone()),
            Some(_) => {
                return Err(format!(
                    "route {} dead-letters to SQS; receive the messages into a JSON-lines file and pass it with --from",
                    route.name
                ))
            }
            None => {}
        }
    }
    files.sort();
    files.dedup();
    if files.is_empty() {
        return Err("no route has a dlq.file; pass a dead-letter file with --from".to_owned());
    }
    Ok(files)
}

/// The skipped lines of `file`, for a report; each is also said on stderr.
fn skipped_json(file: &Path, skipped: &[SkippedLine]) -> Vec<Value> {
    skipped
        .iter()
        .map(|s| {
            eprintln!(
                "warning: {} line {}: not a dead letter, skipped: {}",
                file.display(),
                s.line,
                s.error
            );
            json!({"file": file.display().to_string(), "line": s.line, "error": s.error})
        })
        .collect()
}

/// `dlq inspect`: letters per route and error kind, and the lines that are not letters.
pub fn inspect(config: &Config, from: Option<PathBuf>) -> Result<Report, String> {
    let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut total = 0;
    let mut skipped = Vec::new();
    for file in sources(config, from)? {
        if !file.exists() {
            continue;
        }
        let read = read_letters(&file)?;
        skipped.extend(skipped_json(&file, &read.skipped));
        for letter in read.letters {
            total += 1;
            *counts.entry((letter.route, letter.error_kind)).or_default() += 1;
        }
    }
    let by: Vec<Value> = counts
        .into_iter()
        .map(|((route, kind), n)| json!({"route": route, "error_kind": kind, "count": n}))
        .collect();
    Ok(Report {
        json: json!({
            "total": total,
            "by_route_and_error": by,
            "skipped_lines": skipped.len(),
            "skipped": skipped,
        }),
        ok: true,
    })
}

/// How a redrive may load the function.
#[derive(Clone, Copy, Debug, Default)]
pub struct RedriveLimits {
    /// Invokes per second; default the route's `invoke.rate`.
    pub rate: Option<f64>,
    /// Invokes in flight; default the route's `invoke.max_concurrency`.
    pub concurrency: Option<u32>,
}

/// `dlq redrive`: replays each source file under its lock (`<file>.lock`; a redrive already
/// running on any of them refuses the whole command before anything is replayed).
///
/// A route's live file is first moved aside (the running server's writer follows the
/// rotation to a fresh file), so letters written during the redrive are never overwritten;
/// what fails again is appended to the live file. A `--from` file is rewritten with what
/// failed again. Lines that are not letters are appended to `<file>.unparsable`.
pub async fn redrive_files(
    mut config: Config,
    from: Option<PathBuf>,
    limits: RedriveLimits,
) -> Result<Report, String> {
    redrive::limit_routes(&mut config, limits.rate, limits.concurrency)?;
    let explicit = from.is_some();
    let files = sources(&config, from)?;
    let _locks = files
        .iter()
        .map(|file| RedriveLock::acquire(file).map_err(|e| e.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let mut reports = Vec::new();
    let mut ok = true;
    for file in files {
        if !file.exists() {
            continue;
        }
        let work = if explicit {
            file.clone()
        } else {
            let aside = file.with_extension(format!("redrive-{}", std::process::id()));
            std::fs::rename(&file, &aside)
                .map_err(|e| format!("cannot move {} aside: {e}", file.display()))?;
            aside
        };
        let read_len = file_len(&work)?;
        let read = read_letters(&work)?;
        let skipped = skipped_json(&file, &read.skipped);
        let unparsable = if read.skipped.is_empty() {
            None
        } else {
            let keep = with_suffix(&file, ".unparsable");
            keep_aside(&keep, &read.skipped)?;
            Some(keep.display().to_string())
        };
        let report = redrive::redrive(&config, read.letters)
            .await
            .map_err(|e| e.to_string())?;
        let written_back = if explicit {
            let tmp = with_suffix(&work, ".redrive-tmp");
            write_letters(&tmp, &report.remaining)?;
            std::fs::rename(&tmp, &work)
                .map_err(|e| format!("cannot replace {}: {e}", work.display()))?;
            work.clone()
        } else {
            if !report.remaining.is_empty() {
                let mut sink =
                    FileSink::open(&file).map_err(|e| format!("{}: {e}", file.display()))?;
                sink.write(&report.remaining)
                    .map_err(|e| format!("{}: {e}", file.display()))?;
            }
            // A server's writer that checked for rotation just before the move may still
            // have appended to the moved file after it was read: those letters were
            // confirmed to their callers, so they go back to the live file, not away.
            append_tail(&work, read_len, &file)?;
            std::fs::remove_file(&work)
                .map_err(|e| format!("cannot remove {}: {e}", work.display()))?;
            file.clone()
        };
        ok &= report.remaining.is_empty();
        reports.push(json!({
            "file": file.display().to_string(),
            "total": report.total,
            "succeeded": report.succeeded,
            "function_errors": report.function_errors,
            "failed": report.failed,
            "failed_written_to": written_back.display().to_string(),
            "skipped_lines": read.skipped.len(),
            "skipped": skipped,
            "unparsable_kept_in": unparsable,
        }));
    }
    Ok(Report {
        json: json!({ "redrive": reports }),
        ok,
    })
}

fn file_len(path: &Path) -> Result<u64, String> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// Appends what `from` holds past its first `offset` bytes to `to`, and fsyncs `to`.
fn append_tail(from: &Path, offset: u64, to: &Path) -> Result<(), String> {
    use std::io::{Read, Seek, SeekFrom, Write};
    if file_len(from)? <= offset {
        return Ok(());
    }
    let fail = |e: std::io::Error| format!("cannot move late letters from {}: {e}", from.display());
    let mut source = std::fs::File::open(from).map_err(fail)?;
    source.seek(SeekFrom::Start(offset)).map_err(fail)?;
    let mut tail = Vec::new();
    source.read_to_end(&mut tail).map_err(fail)?;
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(to)
        .map_err(fail)?;
    out.write_all(&tail).map_err(fail)?;
    out.sync_data().map_err(fail)
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Appends the lines that are not letters to `keep`, byte for byte, and fsyncs it.
fn keep_aside(keep: &Path, skipped: &[SkippedLine]) -> Result<(), String> {
    let fail =
        |e: std::io::Error| format!("cannot keep unparsable lines in {}: {e}", keep.display());
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(keep)
        .map_err(fail)?;
    let mut buf = Vec::new();
    for line in skipped {
        buf.extend_from_slice(&line.text);
        buf.push(b'\n');
    }
    out.write_all(&buf).map_err(fail)?;
    out.sync_data().map_err(fail)
}

/// Writes `letters` as a fresh JSON-lines file, fsynced (it replaces the source file).
fn write_letters(path: &Path, letters: &[DeadLetter]) -> Result<(), String> {
    let fail = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    let mut text = Vec::new();
    for letter in letters {
        serde_json::to_writer(&mut text, letter).map_err(|e| e.to_string())?;
        text.push(b'\n');
    }
    let mut out = std::fs::File::create(path).map_err(fail)?;
    out.write_all(&text).map_err(fail)?;
    out.sync_all().map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letters_appended_to_the_moved_file_after_it_was_read_go_back_to_the_live_file() {
        let dir = tempfile::tempdir().unwrap();
        let (work, live) = (
            dir.path().join("dlq.redrive-1"),
            dir.path().join("dlq.jsonl"),
        );
        std::fs::write(&work, "{\"read\":1}\n").unwrap();
        let read_len = file_len(&work).unwrap();
        // A letter lands in the moved file after the redrive read it.
        let mut late = std::fs::OpenOptions::new()
            .append(true)
            .open(&work)
            .unwrap();
        std::io::Write::write_all(&mut late, b"{\"late\":2}\n").unwrap();
        std::fs::write(&live, "{\"live\":3}\n").unwrap();
        append_tail(&work, read_len, &live).unwrap();
        assert_eq!(
            std::fs::read_to_string(&live).unwrap(),
            "{\"live\":3}\n{\"late\":2}\n"
        );
        // Nothing late: nothing appended.
        append_tail(&work, file_len(&work).unwrap(), &live).unwrap();
        assert_eq!(std::fs::read_to_string(&live).unwrap().lines().count(), 2);
    }
}

//! The crash journal, artifacts/.journal/: before a stage moves outputs aside it durably
//! records each move and, for a command, the process group it runs in. The record is
//! deleted once the stage's outcome is settled; a run that finds one ends the group and
//! puts the previous outputs back (`recover`).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::files::remove_path;

const JOURNAL_DIR: &str = ".journal";

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{} is damaged ({reason}); put back by hand what it moved aside (see artifacts/.tmp), then delete it",
        path.display()
    )]
    Damaged { path: PathBuf, reason: String },
}

impl From<JournalError> for std::io::Error {
    fn from(e: JournalError) -> Self {
        std::io::Error::other(e)
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> JournalError {
    let path = path.to_path_buf();
    move |source| JournalError::Io { op, path, source }
}

/// How a record is rolled back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A built-in stage's folder replaced by a staged one in two renames: a folder found in
    /// place is the complete new one and is kept.
    Publish,
    /// A command stage's outputs: whatever is found in place is partial and is dropped.
    Backup,
}

/// One output, as paths relative to the workspace root.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Move {
    pub path: PathBuf,
    /// Where its previous version goes; None: it had none.
    pub aside: Option<PathBuf>,
}

/// A command's process group: its id and its leader's start time (clock ticks after boot,
/// /proc/PID/stat), which tells it from a later group that reuses the id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    pub pgid: i32,
    pub start: u64,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    stage: String,
    kind: Kind,
    moves: Vec<Move>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    group: Option<Group>,
}

/// The workspace root, which journal paths are relative to: artifacts/ lives in it.
fn workspace_root(artifacts: &Path) -> PathBuf {
    artifacts
        .parent()
        .map_or_else(PathBuf::new, Path::to_path_buf)
}

/// `path` (under the workspace root) relative to the root, as journal records keep it.
pub fn relative(artifacts: &Path, path: &Path) -> Result<PathBuf, JournalError> {
    let root = workspace_root(artifacts);
    path.strip_prefix(&root)
        .map(Path::to_path_buf)
        .map_err(|_| JournalError::Io {
            op: "journal",
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("not inside the workspace {}", root.display()),
            ),
        })
}

/// A record on disk for a stage whose outputs are in flux; dropping it leaves the record
/// for the next run to roll back.
pub struct Entry {
    file: PathBuf,
    root: PathBuf,
    record: Record,
}

impl Entry {
    /// Durably records `moves` under `name` (unique per run) before any of them is made.
    pub fn begin(
        artifacts: &Path,
        name: &str,
        stage: &str,
        kind: Kind,
        moves: Vec<Move>,
    ) -> Result<Entry, JournalError> {
        let entry = Entry::prepare(artifacts, name, stage, kind, moves)?;
        entry.save()?;
        Ok(entry)
    }

    /// Like `begin`, but when nothing is to be moved aside (a first run) the record is
    /// written only by `set_group`, just before the command starts: until then nothing of
    /// the stage's outputs exists, and a first run of a long chain of commands saves two
    /// synced writes per stage.
    pub fn begin_until_group(
        artifacts: &Path,
        name: &str,
        stage: &str,
        kind: Kind,
        moves: Vec<Move>,
    ) -> Result<Entry, JournalError> {
        let entry = Entry::prepare(artifacts, name, stage, kind, moves)?;
        if entry.record.moves.iter().any(|m| m.aside.is_some()) {
            entry.save()?;
        }
        Ok(entry)
    }

    fn prepare(
        artifacts: &Path,
        name: &str,
        stage: &str,
        kind: Kind,
        moves: Vec<Move>,
    ) -> Result<Entry, JournalError> {
        let dir = artifacts.join(JOURNAL_DIR);
        if !dir.is_dir() {
            std::fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
            sync_dir(artifacts)?;
        }
        let entry = Entry {
            file: dir.join(format!("{name}.json")),
            root: workspace_root(artifacts),
            record: Record {
                stage: stage.to_string(),
                kind,
                moves,
                group: None,
            },
        };
        Ok(entry)
    }

    pub fn moves(&self) -> &[Move] {
        &self.record.moves
    }

    pub fn set_group(&mut self, group: Group) -> Result<(), JournalError> {
        self.record.group = Some(group);
        self.save()
    }

    /// Puts the previous outputs back; the record goes only once all of them are.
    pub fn roll_back(self) -> Result<(), JournalError> {
        roll_back(&self.root, &self.record)?;
        self.finish()
    }

    /// The stage's outcome stands: forget the record.
    pub fn finish(self) -> Result<(), JournalError> {
        remove_path(&self.file).map_err(io_err("remove", &self.file))
    }

    fn save(&self) -> Result<(), JournalError> {
        let text = serde_json::to_vec_pretty(&self.record).map_err(|e| JournalError::Io {
            op: "encode",
            path: self.file.clone(),
            source: std::io::Error::other(e),
        })?;
        let tmp = self.file.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp).map_err(io_err("create", &tmp))?;
        f.write_all(&text).map_err(io_err("write", &tmp))?;
        // Synced (against power loss, not only a killed process) when it holds previous
        // outputs moved aside: those exist nowhere else. A record of outputs that had no
        // previous version only says what to delete, and losing it loses nothing; syncing it
        // made a first run of a long chain wait on the disk for every stage.
        let durable = self.record.moves.iter().any(|m| m.aside.is_some());
        if durable {
            f.sync_all().map_err(io_err("sync", &tmp))?;
        }
        std::fs::rename(&tmp, &self.file).map_err(io_err("write", &self.file))?;
        match self.file.parent() {
            Some(dir) if durable => sync_dir(dir),
            _ => Ok(()),
        }
    }
}

fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync", dir))
}

fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

/// Undoes a record's moves. Safe to repeat: an aside copy that is gone was either never
/// made (the output is still in place) or already put back.
fn roll_back(root: &Path, record: &Record) -> Result<(), JournalError> {
    for m in &record.moves {
        let path = root.join(&m.path);
        match &m.aside {
            Some(aside) => {
                let aside = root.join(aside);
                if !exists(&aside) {
                    continue;
                }
                if record.kind == Kind::Publish && exists(&path) {
                    remove_path(&aside).map_err(io_err("remove", &aside))?;
                    continue;
                }
                remove_path(&path).map_err(io_err("remove", &path))?;
                std::fs::rename(&aside, &path).map_err(io_err("put back", &path))?;
                if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    sync_dir(parent)?;
                }
            }
            None if record.kind == Kind::Backup => {
                remove_path(&path).map_err(io_err("remove", &path))?;
            }
            None => {}
        }
    }
    Ok(())
}

/// Run at the start of a run, holding the run lock: ends the process groups that crashed
/// runs left running, rolls back every record, then empties artifacts/.tmp. Returns a line
/// per thing done, for the console.
/// `end_group` ends a leftover process group and says whether anything was left (the
/// command runner's; passed in so the journal does not depend on how commands run).
pub fn recover(
    artifacts: &Path,
    end_group: impl Fn(&Group) -> bool,
) -> Result<Vec<String>, JournalError> {
    let dir = artifacts.join(JOURNAL_DIR);
    let root = workspace_root(artifacts);
    let mut records = Vec::new();
    match std::fs::read_dir(&dir) {
        Ok(items) => {
            for item in items {
                let path = item.map_err(io_err("list", &dir))?.path();
                let name = path.to_string_lossy();
                if name.ends_with(".json.tmp") {
                    // A write that never got renamed into place: nothing acted on it.
                    remove_path(&path).map_err(io_err("remove", &path))?;
                } else if name.ends_with(".json") {
                    let text = std::fs::read(&path).map_err(io_err("read", &path))?;
                    let record: Record =
                        serde_json::from_slice(&text).map_err(|e| JournalError::Damaged {
                            path: path.clone(),
                            reason: e.to_string(),
                        })?;
                    records.push((path, record));
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("list", &dir)(e)),
    }
    records.sort_by(|a, b| a.0.cmp(&b.0));
    let mut notes = Vec::new();
    // First stop every leftover process, so none writes while outputs are put back.
    for (_, record) in &records {
        if let Some(group) = &record.group {
            if end_group(group) {
                notes.push(format!(
                    "{}: ended the processes a crashed run left running (process group {})",
                    record.stage, group.pgid
                ));
            }
        }
    }
    for (path, record) in &records {
        roll_back(&root, record)?;
        remove_path(path).map_err(io_err("remove", path))?;
        notes.push(format!(
            "{}: rolled back an interrupted run (previous outputs put back)",
            record.stage
        ));
    }
    // Holding the run lock, with every record settled, the rest of .tmp is leftovers.
    let _ = remove_path(&artifacts.join(".tmp"));
    Ok(notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        if let Some(p) = path.parent() {
            std::fs::create_dir_all(p).unwrap();
        }
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn backup_record_puts_previous_outputs_back_and_drops_new_ones() {
        let dir = tempfile::tempdir().unwrap();
        let artifacts = dir.path().join("artifacts");
        write(&dir.path().join("out.txt"), "partial");
        write(&dir.path().join("new.txt"), "partial");
        write(&artifacts.join(".tmp/s-backup/0"), "previous");
        let moves = vec![
            Move {
                path: "out.txt".into(),
                aside: Some("artifacts/.tmp/s-backup/0".into()),
            },
            Move {
                path: "new.txt".into(),
                aside: None,
            },
            Move {
                path: "untouched.txt".into(),
                aside: Some("artifacts/.tmp/s-backup/2".into()),
            },
        ];
        write(&dir.path().join("untouched.txt"), "previous, never moved");
        let entry = Entry::begin(&artifacts, "s-backup", "s", Kind::Backup, moves).unwrap();
        drop(entry); // a crash
        let notes = recover(&artifacts, |_| false).unwrap();
        assert_eq!(notes.len(), 1, "{notes:?}");
        let read = |p: &str| std::fs::read_to_string(dir.path().join(p)).unwrap();
        assert_eq!(read("out.txt"), "previous");
        assert_eq!(read("untouched.txt"), "previous, never moved");
        assert!(!dir.path().join("new.txt").exists());
        assert!(!artifacts.join(".tmp").exists());
        assert_eq!(
            std::fs::read_dir(artifacts.join(JOURNAL_DIR))
                .unwrap()
                .count(),
            0
        );
        assert!(recover(&artifacts, |_| false).unwrap().is_empty());
    }

    #[test]
    fn publish_record_keeps_a_new_folder_in_place_else_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let artifacts = dir.path().join("artifacts");
        for (stage, new_in_place) in [("a", true), ("b", false)] {
            write(&artifacts.join(format!(".tmp/{stage}-old/f")), "old");
            if new_in_place {
                write(&artifacts.join(format!("{stage}/f")), "new");
            }
            let moves = vec![Move {
                path: format!("artifacts/{stage}").into(),
                aside: Some(format!("artifacts/.tmp/{stage}-old").into()),
            }];
            let name = format!("{stage}-old");
            drop(Entry::begin(&artifacts, &name, stage, Kind::Publish, moves).unwrap());
        }
        recover(&artifacts, |_| false).unwrap();
        let read = |p: &str| std::fs::read_to_string(artifacts.join(p)).unwrap();
        assert_eq!(read("a/f"), "new");
        assert_eq!(read("b/f"), "old");
    }

    #[test]
    fn damaged_record_stops_recovery_and_keeps_the_backups() {
        let dir = tempfile::tempdir().unwrap();
        let artifacts = dir.path().join("artifacts");
        write(&artifacts.join(".tmp/s-backup/0"), "previous");
        write(&artifacts.join(".journal/s-backup.json"), "{ not json");
        let err = recover(&artifacts, |_| false).unwrap_err();
        assert!(matches!(err, JournalError::Damaged { .. }), "{err}");
        assert!(artifacts.join(".tmp/s-backup/0").exists());
    }
}

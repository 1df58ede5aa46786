//! Putting outputs in place without losing the previous ones: fresh folders under
//! artifacts/.tmp, a built-in stage's outputs published by atomic rename, a command stage's
//! declared outputs moved aside while it runs and put back if it fails. Every move aside is
//! journaled first (crate::journal), so a crash in between is rolled back by the next run.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use crate::journal::{self, Entry, Group, JournalError, Kind, Move};

/// A unique name for a folder under artifacts/.tmp/ (and for its journal record).
fn temp_name(stage: &str, purpose: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{stage}-{purpose}-{}-{n}", std::process::id())
}

/// A fresh, unique folder under artifacts/.tmp/.
pub fn temp_dir(artifacts: &Path, stage: &str, purpose: &str) -> PathBuf {
    artifacts.join(".tmp").join(temp_name(stage, purpose))
}

pub use crate::files::remove_path;

/// Replaces artifacts/<stage> with `staged` (a folder under artifacts/.tmp) in two
/// journaled renames; the old outputs are only deleted once the new ones are in place.
pub fn publish_dir(artifacts: &Path, stage: &str, staged: &Path) -> std::io::Result<()> {
    let dest = artifacts.join(stage);
    if std::fs::symlink_metadata(&dest).is_err() {
        return std::fs::rename(staged, &dest);
    }
    let name = temp_name(stage, "old");
    let old = artifacts.join(".tmp").join(&name);
    let moves = vec![Move {
        path: journal::relative(artifacts, &dest)?,
        aside: Some(journal::relative(artifacts, &old)?),
    }];
    let entry = Entry::begin(artifacts, &name, stage, Kind::Publish, moves)?;
    if let Err(e) = std::fs::rename(&dest, &old) {
        settle(entry.finish(), stage);
        return Err(e);
    }
    if let Err(e) = std::fs::rename(staged, &dest) {
        settle(entry.roll_back(), stage);
        return Err(e);
    }
    // The new outputs are in place: from here on a crash keeps them.
    settle(entry.finish(), stage);
    let _ = remove_path(&old);
    Ok(())
}

/// A journal step that failed leaves its record behind, for the next run to settle.
fn settle(result: Result<(), JournalError>, stage: &str) {
    if let Err(e) = result {
        tracing::warn!(stage, "{e}; the next run finishes the job");
    }
}

/// `Entry::begin` or `Entry::begin_until_group`.
type BeginFn = fn(&Path, &str, &str, Kind, Vec<Move>) -> Result<Entry, JournalError>;

/// A command stage's declared outputs moved aside while it runs, put back if it fails.
pub struct Backup {
    dir: PathBuf,
    entry: Entry,
    stage: String,
}

impl Backup {
    /// Journals every declared output (with where its current version goes), then moves
    /// the existing ones aside.
    pub fn take(
        root: &Path,
        artifacts: &Path,
        stage: &str,
        outs: &[String],
    ) -> Result<Backup, JournalError> {
        Backup::take_with(root, artifacts, stage, outs, Entry::begin)
    }

    /// `take` for a command that is about to start: with nothing to move aside, the record
    /// is first written by `set_group`, before the command runs.
    pub fn take_for_command(
        root: &Path,
        artifacts: &Path,
        stage: &str,
        outs: &[String],
    ) -> Result<Backup, JournalError> {
        Backup::take_with(root, artifacts, stage, outs, Entry::begin_until_group)
    }

    fn take_with(
        root: &Path,
        artifacts: &Path,
        stage: &str,
        outs: &[String],
        begin: BeginFn,
    ) -> Result<Backup, JournalError> {
        let name = temp_name(stage, "backup");
        let dir = artifacts.join(".tmp").join(&name);
        let mut moves = Vec::with_capacity(outs.len());
        for (n, out) in outs.iter().enumerate() {
            let aside = match std::fs::symlink_metadata(root.join(out)) {
                Ok(_) => Some(journal::relative(artifacts, &dir.join(n.to_string()))?),
                Err(_) => None,
            };
            moves.push(Move {
                path: PathBuf::from(out),
                aside,
            });
        }
        let entry = begin(artifacts, &name, stage, Kind::Backup, moves)?;
        let backup = Backup {
            dir,
            entry,
            stage: stage.to_string(),
        };
        if let Err(e) = backup.move_aside(root) {
            backup.restore();
            return Err(e);
        }
        Ok(backup)
    }

    fn move_aside(&self, root: &Path) -> Result<(), JournalError> {
        for m in self.entry.moves() {
            let Some(aside) = &m.aside else { continue };
            let io = |op, path: &Path| {
                let path = path.to_path_buf();
                move |source| JournalError::Io { op, path, source }
            };
            std::fs::create_dir_all(&self.dir).map_err(io("create", &self.dir))?;
            let path = root.join(&m.path);
            std::fs::rename(&path, root.join(aside)).map_err(io("move aside", &path))?;
        }
        Ok(())
    }

    /// Records the process group the stage's command runs in, before it starts.
    pub fn set_group(&mut self, group: Group) -> Result<(), JournalError> {
        self.entry.set_group(group)
    }

    /// Puts the previous outputs back, dropping whatever the failed run wrote there. What
    /// cannot be put back now stays journaled, and the next run does it.
    pub fn restore(self) {
        match self.entry.roll_back() {
            Ok(()) => {
                let _ = std::fs::remove_dir_all(&self.dir);
            }
            Err(e) => settle(Err(e), &self.stage),
        }
    }

    /// The new outputs stand: forgets the previous ones.
    pub fn discard(self) {
        settle(self.entry.finish(), &self.stage);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

//! Putting outputs in place without losing the previous ones: fresh folders under
//! artifacts/.tmp, a built-in stage's outputs published by atomic rename, a command stage's
//! declared outputs moved aside while it runs and put back if it fails.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

/// A fresh, unique folder under artifacts/.tmp/.
pub fn temp_dir(artifacts: &Path, stage: &str, purpose: &str) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    artifacts
        .join(".tmp")
        .join(format!("{stage}-{purpose}-{}-{n}", std::process::id()))
}

pub fn remove_path(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Replaces artifacts/<stage> with `staged` in two renames; the old outputs are only
/// deleted once the new ones are in place.
pub fn publish_dir(artifacts: &Path, stage: &str, staged: &Path) -> std::io::Result<()> {
    let dest = artifacts.join(stage);
    let old = temp_dir(artifacts, stage, "old");
    let had_old = dest.exists();
    if had_old {
        std::fs::rename(&dest, &old)?;
    }
    if let Err(e) = std::fs::rename(staged, &dest) {
        if had_old {
            let _ = std::fs::rename(&old, &dest);
        }
        return Err(e);
    }
    if had_old {
        let _ = remove_path(&old);
    }
    Ok(())
}

/// A command stage's declared outputs moved aside while it runs, put back if it fails.
pub struct Backup {
    dir: PathBuf,
    moved: Vec<(PathBuf, PathBuf)>,
}

impl Backup {
    pub fn take(
        root: &Path,
        artifacts: &Path,
        stage: &str,
        outs: &[String],
    ) -> std::io::Result<Backup> {
        let dir = temp_dir(artifacts, stage, "backup");
        let mut backup = Backup {
            dir,
            moved: Vec::new(),
        };
        for (n, out) in outs.iter().enumerate() {
            let path = root.join(out);
            if std::fs::symlink_metadata(&path).is_ok() {
                std::fs::create_dir_all(&backup.dir)?;
                let aside = backup.dir.join(n.to_string());
                if let Err(e) = std::fs::rename(&path, &aside) {
                    backup.restore();
                    return Err(e);
                }
                backup.moved.push((path, aside));
            }
        }
        Ok(backup)
    }

    /// Puts the previous outputs back, dropping whatever the failed run wrote there.
    pub fn restore(&self) {
        for (path, aside) in &self.moved {
            let _ = remove_path(path);
            let _ = std::fs::rename(aside, path);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }

    pub fn discard(&self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

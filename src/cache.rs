//! The run cache in artifacts/.cache/: output files stored by content (objects/) and, per
//! fingerprint, the lock entry of the run that produced them (runs/). Going back to a
//! fingerprint seen before restores its outputs without running the stage.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::lock::LockEntry;
use crate::manifest::{FileRecord, MISSING};

/// A suffix no other writer uses: this process's id and a counter (stages store from
/// several workers at once, possibly the same object).
pub fn unique() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{n}", std::process::id())
}

/// A run cache as the engine uses it: the seam where a remote cache plugs in. `lookup`
/// answers only for runs whose every output can be had; `materialize` verifies what it
/// copies, so a bad object is an error (the stage then runs), never a wrong output.
pub trait Cache: Sync {
    fn lookup(&self, fingerprint: &str) -> Option<Hit>;
    /// Copies one output file of `hit` to `dest` (parents created), blake3 verified.
    fn materialize(&self, hit: &Hit, record: &FileRecord, dest: &Path) -> std::io::Result<()>;
    /// Keeps the outputs (read from the workspace `root`) of a run that just finished.
    fn store(&self, root: &Path, entry: &LockEntry) -> std::io::Result<()>;
    /// A failure that must end the run (a remote cache marked `required` that failed);
    /// checked after every stage.
    fn failure(&self) -> Option<String> {
        None
    }
}

/// A cached run found by its fingerprint.
pub struct Hit {
    /// The lock entry of the run that produced the outputs.
    pub entry: LockEntry,
    /// Where it was found, as the status line says it: "cache" (this workspace's run
    /// cache) or "remote" (the `[cache] remote`).
    pub from: &'static str,
}

/// The local run cache, artifacts/.cache/.
pub struct RunCache {
    dir: PathBuf,
}

impl Cache for RunCache {
    fn lookup(&self, fingerprint: &str) -> Option<Hit> {
        self.lookup(fingerprint).map(|entry| Hit {
            entry,
            from: "cache",
        })
    }

    fn materialize(&self, _hit: &Hit, record: &FileRecord, dest: &Path) -> std::io::Result<()> {
        self.materialize(record, dest)
    }

    fn store(&self, root: &Path, entry: &LockEntry) -> std::io::Result<()> {
        self.store(root, entry)
    }
}

#[derive(Debug, Default)]
pub struct GcReport {
    pub runs_removed: usize,
    pub objects_removed: usize,
    pub bytes_freed: u64,
    /// Checkpoint folders of trainings no run would resume.
    pub scratch_removed: usize,
}

impl RunCache {
    pub fn new(artifacts: &Path) -> Self {
        RunCache {
            dir: artifacts.join(".cache"),
        }
    }

    /// Where the object `hash` is (or would be) kept.
    pub fn object(&self, hash: &str) -> PathBuf {
        let (prefix, rest) = hash.split_at(2.min(hash.len()));
        self.dir.join("objects").join(prefix).join(rest)
    }

    fn run_file(&self, fingerprint: &str) -> PathBuf {
        self.dir.join("runs").join(format!("{fingerprint}.toml"))
    }

    /// Whether every output file of `entry` is kept here.
    pub fn has_objects(&self, entry: &LockEntry) -> bool {
        entry
            .outs
            .iter()
            .all(|r| r.blake3 == MISSING || self.object(&r.blake3).is_file())
    }

    /// Keeps a copy of `source`, whose content the caller verified to be `hash`.
    pub fn keep(&self, hash: &str, source: &Path) -> std::io::Result<()> {
        let object = self.object(hash);
        if object.is_file() {
            return Ok(());
        }
        if let Some(parent) = object.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let tmp = object.with_extension(format!("tmp{}", unique()));
        std::fs::copy(source, &tmp)?;
        std::fs::rename(&tmp, &object)
    }

    /// Records the run `entry` describes without its files (they come with [`Self::keep`]):
    /// [`Self::lookup`] answers for it once every one of them is here.
    pub fn record(&self, entry: &LockEntry) -> std::io::Result<()> {
        let run = self.run_file(&entry.fingerprint);
        if let Some(parent) = run.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let text = toml::to_string(entry).map_err(std::io::Error::other)?;
        let tmp = run.with_extension(format!("toml.tmp{}", unique()));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &run)
    }

    /// Keeps a copy of every output file and the entry describing them. Copies, not hard
    /// links: a user editing a published file in place must not corrupt the cache.
    pub fn store(&self, root: &Path, entry: &LockEntry) -> std::io::Result<()> {
        for r in &entry.outs {
            if r.blake3 == MISSING {
                continue;
            }
            let object = self.object(&r.blake3);
            if object.exists() {
                continue;
            }
            if let Some(parent) = object.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let tmp = object.with_extension(format!("tmp{}", unique()));
            std::fs::copy(root.join(&r.path), &tmp)?;
            std::fs::rename(&tmp, &object)?;
        }
        self.record(entry)
    }

    /// The entry of an earlier run with this fingerprint, if all its objects are still here.
    pub fn lookup(&self, fingerprint: &str) -> Option<LockEntry> {
        let text = std::fs::read_to_string(self.run_file(fingerprint)).ok()?;
        let entry: LockEntry = toml::from_str(&text).ok()?;
        (entry.fingerprint == fingerprint && self.has_objects(&entry)).then_some(entry)
    }

    /// Copies a cached file to `dest` (parents created) and checks the copy's blake3: an
    /// object whose bytes changed since it was stored is deleted from the cache and reported
    /// as `InvalidData`, so the caller recomputes instead of publishing wrong bytes.
    pub fn materialize(&self, record: &FileRecord, dest: &Path) -> std::io::Result<()> {
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let object = self.object(&record.blake3);
        std::fs::copy(&object, dest)?;
        let actual = crate::manifest::hash_file(dest)?;
        if actual != record.blake3 {
            let _ = std::fs::remove_file(dest);
            let _ = std::fs::remove_file(&object);
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "cached copy of `{}` ({}) is corrupt (its blake3 is now {}); dropped it",
                    record.path,
                    object.display(),
                    &actual[..16.min(actual.len())]
                ),
            ));
        }
        Ok(())
    }

    /// Deletes every run not in `keep` and every object no kept run references.
    pub fn gc(&self, keep: &HashSet<String>) -> std::io::Result<GcReport> {
        let mut report = GcReport::default();
        let mut live = HashSet::new();
        let runs = self.dir.join("runs");
        if runs.is_dir() {
            for item in std::fs::read_dir(&runs)? {
                let path = item?.path();
                let fingerprint = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let entry = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|t| toml::from_str::<LockEntry>(&t).ok());
                match entry {
                    Some(entry) if keep.contains(&fingerprint) => {
                        live.extend(entry.outs.into_iter().map(|r| r.blake3))
                    }
                    _ => {
                        std::fs::remove_file(&path)?;
                        report.runs_removed += 1;
                    }
                }
            }
        }
        let objects = self.dir.join("objects");
        if objects.is_dir() {
            for prefix in std::fs::read_dir(&objects)? {
                let prefix = prefix?;
                let prefix_name = prefix.file_name().to_string_lossy().into_owned();
                for item in std::fs::read_dir(prefix.path())? {
                    let item = item?;
                    let hash = format!("{prefix_name}{}", item.file_name().to_string_lossy());
                    if !live.contains(&hash) {
                        report.bytes_freed += item.metadata().map(|m| m.len()).unwrap_or(0);
                        std::fs::remove_file(item.path())?;
                        report.objects_removed += 1;
                    }
                }
                // Only succeeds once the prefix folder is empty, which is what we want.
                let _ = std::fs::remove_dir(prefix.path());
            }
        }
        Ok(report)
    }
}

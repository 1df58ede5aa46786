//! The cache a `run` uses when `[cache] remote` is set: the local run cache first, then the
//! remote. A remote hit is downloaded, verified and kept locally; a run that finished is
//! stored locally and (push = "auto") pushed. The first failure of the remote itself ends
//! its use for the run with one warning, or (required = true) fails the run.

use std::collections::HashSet;
use std::path::Path;
use std::sync::Mutex;

use crate::cache::{Cache, Hit, RunCache};
use crate::config::{CacheSettings, PushMode};
use crate::lock::LockEntry;
use crate::manifest::{FileRecord, MISSING};
use crate::progress::Console;
use fmnist_stages::Progress;

use super::{is_unavailable, Remote};

pub struct TieredCache<'a> {
    local: RunCache,
    /// None when it could not be opened (the failure is then in `down`).
    remote: Option<Remote>,
    push: PushMode,
    required: bool,
    console: &'a Console,
    /// Why the remote is no longer used in this run (its first failure).
    down: Mutex<Option<String>>,
    /// Objects whose remote copy was found corrupt: a push replaces them.
    corrupt: Mutex<HashSet<String>>,
}

impl<'a> TieredCache<'a> {
    /// The local cache under `artifacts`, with the remote of `settings` behind it.
    pub fn new(artifacts: &Path, settings: &CacheSettings, console: &'a Console) -> Self {
        let mut cache = TieredCache {
            local: RunCache::new(artifacts),
            remote: None,
            push: settings.push,
            required: settings.required,
            console,
            down: Mutex::new(None),
            corrupt: Mutex::default(),
        };
        match Remote::open(settings) {
            Ok(remote) => cache.remote = Some(remote),
            Err(e) => cache.fault(&e),
        }
        cache
    }

    /// Contacts the remote now (a `required` one is checked before anything runs).
    pub fn check(&self) -> Result<(), String> {
        if let Some(remote) = self.usable() {
            if let Err(e) = remote.block_on(remote.ping()) {
                self.fault(&e.to_string());
            }
        }
        match self.down.lock() {
            Ok(down) => down.clone().map_or(Ok(()), Err),
            Err(_) => Ok(()),
        }
    }

    /// The remote, unless it failed earlier in this run.
    fn usable(&self) -> Option<&Remote> {
        let down = self.down.lock().map(|d| d.is_some()).unwrap_or(true);
        if down {
            None
        } else {
            self.remote.as_ref()
        }
    }

    fn shown(&self) -> &str {
        self.remote
            .as_ref()
            .map_or("(not opened)", |r| r.shown.as_str())
    }

    /// The remote failed: the first time, say so once; it is not asked again this run.
    fn fault(&self, why: &str) {
        let Ok(mut down) = self.down.lock() else {
            return;
        };
        if down.is_some() {
            return;
        }
        let why = match &self.remote {
            Some(r) => r.scrub(why),
            None => why.to_string(),
        };
        let message = format!("remote cache {}: {why}", self.shown());
        // A required remote's failure ends the run, whose error says it.
        if !self.required {
            self.console.line(&format!(
                "warning: {message}; going on without the remote for this run"
            ));
        }
        *down = Some(message);
    }

    /// Downloads every file of `entry` the local cache lacks into it, verified, in parallel.
    /// A live bar on a terminal (nothing printed otherwise: the stage's line says it).
    fn fetch(&self, remote: &Remote, entry: &LockEntry) -> std::io::Result<()> {
        let progress = self.console.stage("remote");
        let missing = entry
            .outs
            .iter()
            .filter(|r| r.blake3 != MISSING && !self.local.object(&r.blake3).is_file())
            .count();
        if missing > 0 {
            progress.start("downloading", missing as u64, "files");
        }
        fetch_into(&self.local, remote, entry.outs.iter(), |hash, result| {
            if result
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::InvalidData)
            {
                if let Ok(mut corrupt) = self.corrupt.lock() {
                    corrupt.insert(hash.to_string());
                }
            }
            progress.advance(1)
        })
    }

    /// Pushes `entry`'s outputs (from the local cache, which holds them by now) and then
    /// its run record.
    fn push_entry(&self, remote: &Remote, entry: &LockEntry) -> std::io::Result<()> {
        let mut files: Vec<(String, std::path::PathBuf)> = entry
            .outs
            .iter()
            .filter(|r| r.blake3 != MISSING)
            .map(|r| (r.blake3.clone(), self.local.object(&r.blake3)))
            .collect();
        files.sort();
        files.dedup_by(|a, b| a.0 == b.0);
        let progress = self.console.stage("remote");
        progress.start("pushing", files.len() as u64, "files");
        let replace = self.corrupt.lock().map(|c| c.clone()).unwrap_or_default();
        let results =
            remote.block_on(remote.upload_all(files, &replace, |_, _| progress.advance(1)));
        if let Some((_, Err(e))) = results.into_iter().find(|(_, r)| r.is_err()) {
            return Err(e);
        }
        remote.block_on(remote.put_run(entry))
    }
}

impl Cache for TieredCache<'_> {
    fn lookup(&self, fingerprint: &str) -> Option<Hit> {
        if let Some(entry) = self.local.lookup(fingerprint) {
            return Some(Hit {
                entry,
                from: "cache",
            });
        }
        let remote = self.usable()?;
        let entry = match remote.block_on(remote.get_run(fingerprint)) {
            Ok(Some(entry)) => entry,
            Ok(None) => return None,
            Err(e) if is_unavailable(&e) => {
                self.fault(&e.to_string());
                return None;
            }
            Err(e) => {
                self.console.line(&format!(
                    "warning: remote cache {}: {}; ignoring that run record",
                    self.shown(),
                    remote.scrub(&e.to_string())
                ));
                return None;
            }
        };
        match self.fetch(remote, &entry) {
            Ok(()) => {
                // Kept locally too: next time the local cache answers.
                let _ = self.local.record(&entry);
                Some(Hit {
                    entry,
                    from: "remote",
                })
            }
            Err(e) if is_unavailable(&e) => {
                self.fault(&e.to_string());
                None
            }
            Err(e) => {
                self.console.line(&format!(
                    "warning: remote cache {}: {}; not restoring from it",
                    self.shown(),
                    remote.scrub(&e.to_string())
                ));
                None
            }
        }
    }

    /// A remote hit's files come from the local cache, which `lookup` filled.
    fn materialize(&self, _hit: &Hit, record: &FileRecord, dest: &Path) -> std::io::Result<()> {
        self.local.materialize(record, dest)
    }

    fn store(&self, root: &Path, entry: &LockEntry) -> std::io::Result<()> {
        self.local.store(root, entry)?;
        if self.push == PushMode::Manual {
            return Ok(());
        }
        let Some(remote) = self.usable() else {
            return Ok(());
        };
        if let Err(e) = self.push_entry(remote, entry) {
            if is_unavailable(&e) {
                self.fault(&e.to_string());
            } else {
                self.console.line(&format!(
                    "warning: could not push to the remote cache {}: {}",
                    self.shown(),
                    remote.scrub(&e.to_string())
                ));
            }
        }
        Ok(())
    }

    fn failure(&self) -> Option<String> {
        if !self.required {
            return None;
        }
        self.down.lock().ok().and_then(|d| d.clone())
    }
}

/// Downloads the objects of `records` that `local` lacks into it, verified, in parallel;
/// `done` is told of each. The first error is returned (after every transfer ended).
pub(super) fn fetch_into<'r>(
    local: &RunCache,
    remote: &Remote,
    records: impl Iterator<Item = &'r FileRecord>,
    done: impl Fn(&str, &std::io::Result<u64>),
) -> std::io::Result<()> {
    let mut files: Vec<(String, std::path::PathBuf)> = records
        .filter(|r| r.blake3 != MISSING && !local.object(&r.blake3).is_file())
        .map(|r| (r.blake3.clone(), std::path::PathBuf::new()))
        .collect();
    files.sort();
    files.dedup_by(|a, b| a.0 == b.0);
    for (hash, tmp) in &mut files {
        *tmp = local
            .object(hash)
            .with_extension(format!("part{}", crate::cache::unique()));
    }
    let temps: std::collections::HashMap<String, std::path::PathBuf> =
        files.iter().cloned().collect();
    let results = remote.block_on(remote.download_all(files, done));
    let mut first = None;
    for (hash, result) in results {
        let tmp = &temps[&hash];
        let kept = result.and_then(|_| std::fs::rename(tmp, local.object(&hash)));
        if let Err(e) = kept {
            let _ = std::fs::remove_file(tmp);
            // A remote that is down matters more than one bad object.
            if first
                .as_ref()
                .is_none_or(|f| !is_unavailable(f) && is_unavailable(&e))
            {
                first = Some(e);
            }
        }
    }
    first.map_or(Ok(()), Err)
}

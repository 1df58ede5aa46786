//! `push`, `pull` and `status --remote`: the remote cache by hand, for the runs the lock
//! names (like `dvc push`, `dvc pull`, `dvc status -c`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use fmnist_stages::Progress;
use serde::Serialize;

use crate::cache::{Hit, RunCache};
use crate::error::PipeError;
use crate::lock::{self, LockEntry};
use crate::manifest::{self, MISSING};
use crate::progress::Console;
use crate::workspace::{self, RunGuard, Workspace};

use super::tiered::fetch_into;
use super::{is_unavailable, Remote};

fn open(ws: &Workspace) -> Result<Remote, PipeError> {
    if ws.pipeline.cache.remote.is_none() {
        return Err(PipeError::Config(
            "no remote cache: set `remote` in the [cache] table of pipeline.toml \
             (or pass --set cache.remote=s3://BUCKET/PREFIX)"
                .into(),
        ));
    }
    Remote::open(&ws.pipeline.cache).map_err(PipeError::Config)
}

/// The lock entries of the selected stages (every stage when `targets` is empty), in run
/// order; stages never run are named in the second list.
fn recorded<'a>(
    ws: &'a Workspace,
    targets: &[usize],
) -> (Vec<(&'a str, &'a LockEntry)>, Vec<&'a str>) {
    let mut entries = Vec::new();
    let mut never = Vec::new();
    for &i in &ws.dag.order {
        if !targets.is_empty() && !targets.contains(&i) {
            continue;
        }
        let name = ws.pipeline.stages[i].name.as_str();
        match ws.lock.stages.get(name) {
            Some(entry) => entries.push((name, entry)),
            None => never.push(name),
        }
    }
    (entries, never)
}

fn files_word(n: usize) -> String {
    format!("{n} file{}", if n == 1 { "" } else { "s" })
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

fn remote_error(remote: &Remote, e: &std::io::Error) -> PipeError {
    PipeError::io(
        format!("remote cache {}", remote.shown),
        std::io::Error::new(e.kind(), remote.scrub(&e.to_string())),
    )
}

/// `push`: uploads the outputs of every run the lock names (of the selected stages), then
/// their run records. Files come from the local run cache, else from the workspace if
/// unchanged since recorded.
pub fn push(ws: &Workspace, targets: &[usize], console: &Console) -> Result<(), PipeError> {
    let remote = open(ws)?;
    let local = RunCache::new(&ws.pipeline.artifacts());
    let root = &ws.pipeline.root;
    let (entries, never) = recorded(ws, targets);
    for name in never {
        console.line(&format!("{name}: never run, nothing to push"));
    }
    let mut files: BTreeMap<String, PathBuf> = BTreeMap::new();
    for (_, entry) in &entries {
        for r in entry.outs.iter().filter(|r| r.blake3 != MISSING) {
            let object = local.object(&r.blake3);
            let source = if object.is_file() {
                object
            } else {
                root.join(&r.path)
            };
            files.entry(r.blake3.clone()).or_insert(source);
        }
    }
    let progress = console.stage("push");
    progress.start("uploading", files.len() as u64, "files");
    let sent_bytes = AtomicU64::new(0);
    let sent_files = AtomicUsize::new(0);
    let results = remote.block_on(remote.upload_all(
        files.into_iter().collect(),
        &Default::default(),
        |_, r| {
            if let Ok(n) = r {
                if *n > 0 {
                    sent_bytes.fetch_add(*n, Ordering::Relaxed);
                    sent_files.fetch_add(1, Ordering::Relaxed);
                }
            }
            progress.advance(1);
        },
    ));
    let total = results.len();
    let failed: BTreeMap<String, std::io::Error> = results
        .into_iter()
        .filter_map(|(hash, r)| r.err().map(|e| (hash, e)))
        .collect();
    if let Some(e) = failed.values().find(|e| is_unavailable(e)) {
        drop(progress);
        return Err(remote_error(&remote, e));
    }
    let sent = sent_files.load(Ordering::Relaxed);
    progress.finish(&format!(
        "{} uploaded ({}), {} already in the remote",
        files_word(sent),
        megabytes(sent_bytes.load(Ordering::Relaxed)),
        total - sent - failed.len()
    ));
    let mut problems = Vec::new();
    let mut pushed = 0;
    for (name, entry) in &entries {
        let broken = entry
            .outs
            .iter()
            .find_map(|r| failed.get(&r.blake3).map(|e| (r, e)));
        if let Some((record, e)) = broken {
            console.line(&format!(
                "{name}: not pushed: `{}`: {}",
                record.path,
                remote.scrub(&e.to_string())
            ));
            problems.push(name.to_string());
            continue;
        }
        remote
            .block_on(remote.put_run(entry))
            .map_err(|e| remote_error(&remote, &e))?;
        pushed += 1;
    }
    console.line(&format!(
        "pushed {pushed} run{} to {}",
        if pushed == 1 { "" } else { "s" },
        remote.shown
    ));
    if problems.is_empty() {
        Ok(())
    } else {
        Err(PipeError::StageFailed(format!(
            "could not push {} (run `fmnist-pipe run` to bring them up to date first)",
            problems.join(", ")
        )))
    }
}

/// `pull`: downloads the outputs of every run the lock names (of the selected stages) into
/// the local run cache, verified, and puts missing or changed outputs back in place.
pub fn pull(ws: &mut Workspace, targets: &[usize], console: &Console) -> Result<(), PipeError> {
    let remote = open(ws)?;
    let artifacts = ws.pipeline.artifacts();
    let _guard = RunGuard::acquire(&artifacts)?;
    workspace::recover_crashed_run(&artifacts, |note| console.line(note))?;
    let selected: Vec<usize> = if targets.is_empty() {
        ws.dag.order.clone()
    } else {
        targets.to_vec()
    };
    workspace::check_inside(
        &ws.pipeline,
        selected.iter().copied(),
        &workspace::ENGINE_FOLDERS,
    )?;
    let local = RunCache::new(&artifacts);
    let (entries, never) = recorded(ws, targets);
    for name in never {
        console.line(&format!("{name}: not in the lock, nothing to pull"));
    }
    let entries: Vec<(String, LockEntry)> = entries
        .into_iter()
        .map(|(n, e)| (n.to_string(), e.clone()))
        .collect();
    let wanted: Vec<_> = entries
        .iter()
        .flat_map(|(_, e)| e.outs.iter())
        .filter(|r| r.blake3 != MISSING && !local.object(&r.blake3).is_file())
        .collect();
    let mut unique: Vec<&str> = wanted.iter().map(|r| r.blake3.as_str()).collect();
    unique.sort_unstable();
    unique.dedup();
    let progress = console.stage("pull");
    progress.start("downloading", unique.len() as u64, "files");
    let got_bytes = AtomicU64::new(0);
    let fetched = fetch_into(&local, &remote, wanted.into_iter(), |_, r| {
        if let Ok(n) = r {
            got_bytes.fetch_add(*n, Ordering::Relaxed);
        }
        progress.advance(1);
    });
    match &fetched {
        Err(e) if is_unavailable(e) => {
            drop(progress);
            return Err(remote_error(&remote, e));
        }
        Err(e) => console.line(&format!("warning: {}", remote.scrub(&e.to_string()))),
        Ok(()) => {}
    }
    progress.finish(&format!(
        "{} downloaded ({})",
        files_word(unique.len()),
        megabytes(got_bytes.load(Ordering::Relaxed))
    ));

    let mut lock = std::mem::take(&mut ws.lock);
    let mut dirty = false;
    let mut problems = Vec::new();
    for (name, entry) in entries {
        let Some(stage) = ws.pipeline.stage(&name) else {
            continue;
        };
        let complete = local.has_objects(&entry);
        if complete {
            let _ = local.record(&entry);
        }
        let on_disk = manifest::scan(&ws.pipeline.root, &stage.out_roots(), &entry.outs)
            .map_err(|e| PipeError::io(format!("{name}: cannot read its outputs"), e))?;
        let same = |a: &[manifest::FileRecord], b: &[manifest::FileRecord]| {
            let key = |v: &[manifest::FileRecord]| {
                let mut k: Vec<(String, String)> = v
                    .iter()
                    .filter(|r| r.blake3 != MISSING)
                    .map(|r| (r.path.clone(), r.blake3.clone()))
                    .collect();
                k.sort();
                k
            };
            key(a) == key(b)
        };
        if same(&on_disk, &entry.outs) {
            console.line(&format!("{name}: up to date"));
            continue;
        }
        if !complete {
            console.line(&format!(
                "{name}: not in the remote (or not whole there): push it from where it ran"
            ));
            problems.push(name);
            continue;
        }
        let hit = Hit {
            entry: entry.clone(),
            from: "cache",
        };
        match crate::stage_run::restore_outputs(ws, &local, stage, &hit) {
            Ok(outs) => {
                console.line(&format!("{name}: restored from remote"));
                lock.stages.insert(name, LockEntry { outs, ..entry });
                dirty = true;
            }
            Err(e) => {
                console.line(&format!("{name}: FAILED: cannot restore its outputs: {e}"));
                problems.push(name);
            }
        }
    }
    if dirty {
        let index = workspace::lock_index(&ws.pipeline);
        lock::write_indexed(&ws.lock_path, &lock, Some(&index))?;
    }
    ws.lock = lock;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(PipeError::StageFailed(format!(
            "could not pull {}",
            problems.join(", ")
        )))
    }
}

/// One stage's line of `status --remote`.
#[derive(Serialize)]
pub struct RemoteState {
    pub stage: String,
    /// The fingerprint the lock records (None: never run).
    pub fingerprint: Option<String>,
    /// Every output file of the recorded run is in the local run cache.
    pub local: bool,
    /// "yes" (run record and every file), "no", "incomplete" (the record without every
    /// file), "-" (never run).
    pub remote: &'static str,
}

/// `status --remote`: per stage, whether its recorded run is in the local run cache and in
/// the remote.
pub fn remote_status(ws: &Workspace) -> Result<Vec<RemoteState>, PipeError> {
    let remote = open(ws)?;
    let local = RunCache::new(&ws.pipeline.artifacts());
    let mut states = Vec::new();
    for &i in &ws.dag.order {
        let name = &ws.pipeline.stages[i].name;
        let Some(entry) = ws.lock.stages.get(name) else {
            states.push(RemoteState {
                stage: name.clone(),
                fingerprint: None,
                local: false,
                remote: "-",
            });
            continue;
        };
        let record = remote
            .block_on(remote.get_run(&entry.fingerprint))
            .map_err(|e| remote_error(&remote, &e))?;
        let state = match record {
            None => "no",
            Some(_) => {
                let hashes: Vec<String> = entry
                    .outs
                    .iter()
                    .filter(|r| r.blake3 != MISSING)
                    .map(|r| r.blake3.clone())
                    .collect();
                let there = remote
                    .block_on(remote.which_exist(hashes))
                    .map_err(|e| remote_error(&remote, &e))?;
                if there.iter().all(|(_, yes)| *yes) {
                    "yes"
                } else {
                    "incomplete"
                }
            }
        };
        states.push(RemoteState {
            stage: name.clone(),
            fingerprint: Some(entry.fingerprint.clone()),
            local: local.has_objects(entry),
            remote: state,
        });
    }
    Ok(states)
}

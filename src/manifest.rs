//! File manifests: path, size, mtime and blake3 of every file under a set of paths. Hashing
//! is skipped when size and mtime match a previous manifest, runs memory-mapped and
//! multi-threaded for large files, and in parallel across files.

use std::collections::HashMap;
use std::path::Path;
use std::time::UNIX_EPOCH;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::reason::{FileChange, FileSide, Reason};

/// Marks a declared path that does not exist.
pub const MISSING: &str = "missing";

/// One file as last seen. Paths are workspace-relative with `/` separators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    pub path: String,
    pub size: u64,
    pub mtime_ns: i64,
    pub blake3: String,
}

/// Hashes one file: memory-mapped, and on several threads when it is large.
pub fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut h = blake3::Hasher::new();
    let len = std::fs::metadata(path)?.len();
    if len >= 1 << 20 {
        h.update_mmap_rayon(path)?;
    } else if len >= 1 << 14 {
        h.update_mmap(path)?;
    } else {
        h.update(&std::fs::read(path)?);
    }
    Ok(h.finalize().to_hex().to_string())
}

fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Lists the files under `rel` (a file or a folder) as records, sorted; `shown_as` is the
/// workspace-relative name the records carry (differs from `rel` for a staging folder).
fn list(
    root: &Path,
    rel: &str,
    shown_as: &str,
    out: &mut Vec<(String, u64, i64)>,
) -> std::io::Result<bool> {
    let path = root.join(rel);
    // The error names the path: "too many levels of symbolic links" alone says not where.
    let at = |e: std::io::Error| std::io::Error::new(e.kind(), format!("{rel}: {e}"));
    let meta = match std::fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(at(e)),
    };
    if meta.is_dir() {
        let mut children: Vec<String> = std::fs::read_dir(&path)
            .map_err(at)?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()
            .map_err(at)?;
        children.sort();
        for child in children {
            list(
                root,
                &format!("{rel}/{child}"),
                &format!("{shown_as}/{child}"),
                out,
            )?;
        }
    } else {
        out.push((shown_as.to_string(), meta.len(), mtime_ns(&meta)));
    }
    Ok(true)
}

/// Records for every file under each of `paths` (workspace-relative). A path that does not
/// exist gives one record with hash [`MISSING`]. Files whose size and mtime match `previous`
/// keep their recorded hash.
pub fn scan(
    root: &Path,
    paths: &[String],
    previous: &[FileRecord],
) -> std::io::Result<Vec<FileRecord>> {
    scan_as(
        root,
        paths.iter().map(|p| (p.as_str(), p.as_str())),
        previous,
    )
}

/// Like [`scan`] for pairs (where the files are now, the name they are recorded under).
pub fn scan_as<'a>(
    root: &Path,
    paths: impl IntoIterator<Item = (&'a str, &'a str)>,
    previous: &[FileRecord],
) -> std::io::Result<Vec<FileRecord>> {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    let mut locations = HashMap::new();
    for (actual, shown) in paths {
        let before = found.len();
        if !list(root, actual, shown, &mut found)? {
            missing.push(shown.to_string());
        }
        for (name, _, _) in &found[before..] {
            let inner = name.strip_prefix(shown).unwrap_or("");
            locations.insert(name.clone(), format!("{actual}{inner}"));
        }
    }
    let known: HashMap<&str, &FileRecord> = previous.iter().map(|r| (r.path.as_str(), r)).collect();
    let mut records: Vec<FileRecord> = found
        .into_par_iter()
        .map(|(path, size, mtime_ns)| {
            let blake3 = match known.get(path.as_str()) {
                Some(r) if r.size == size && r.mtime_ns == mtime_ns && r.blake3 != MISSING => {
                    r.blake3.clone()
                }
                _ => hash_file(&root.join(&locations[&path]))?,
            };
            Ok(FileRecord {
                path,
                size,
                mtime_ns,
                blake3,
            })
        })
        .collect::<std::io::Result<_>>()?;
    records.extend(missing.into_iter().map(|path| FileRecord {
        path,
        size: 0,
        mtime_ns: 0,
        blake3: MISSING.to_string(),
    }));
    records.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(records)
}

/// One hash for a set of files: their names and contents, not their times.
pub fn digest(records: &[FileRecord]) -> String {
    let mut h = blake3::Hasher::new();
    for r in records {
        h.update(r.path.as_bytes());
        h.update(&[0]);
        h.update(r.blake3.as_bytes());
        h.update(&[0]);
    }
    h.finalize().to_hex().to_string()
}

/// What differs between two manifests, one reason per file (`side` says whose files).
pub fn diff(side: FileSide, old: &[FileRecord], new: &[FileRecord], out: &mut Vec<Reason>) {
    let old_map: HashMap<&str, &FileRecord> = old.iter().map(|r| (r.path.as_str(), r)).collect();
    let new_map: HashMap<&str, &FileRecord> = new.iter().map(|r| (r.path.as_str(), r)).collect();
    let mut push = |change, path: &str| {
        out.push(Reason::File {
            side,
            change,
            path: path.to_string(),
        })
    };
    for r in new {
        match old_map.get(r.path.as_str()) {
            _ if r.blake3 == MISSING => push(FileChange::Missing, &r.path),
            None => push(FileChange::Added, &r.path),
            Some(o) if o.blake3 == MISSING => push(FileChange::Added, &r.path),
            Some(o) if o.blake3 != r.blake3 => push(FileChange::Modified, &r.path),
            _ => {}
        }
    }
    for r in old {
        if !new_map.contains_key(r.path.as_str()) && r.blake3 != MISSING {
            push(FileChange::Missing, &r.path);
        }
    }
}

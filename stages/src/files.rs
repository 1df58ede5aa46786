//! Listing a stage's output files by extension (the report's galleries and JSON blocks).

use std::path::{Path, PathBuf};

use anyhow::Context;

/// Regular files in `dir` with extension `ext` (any case), sorted by name.
pub fn with_extension(dir: &Path, ext: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("reading the folder {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("reading the folder {}", dir.display()))?;
        let path = entry.path();
        // Regular files only: a symlink could lead anywhere outside the stage's outputs.
        let regular = entry.file_type().is_ok_and(|t| t.is_file());
        if regular && has_extension(&path, ext) {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The PNG images in `dir`, sorted by name.
pub fn pngs_in(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    with_extension(dir, "png")
}

/// Whether `path` ends in `.ext` (any case).
pub fn has_extension(path: &Path, ext: &str) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case(ext))
}

/// The file name of `path`, for captions.
pub fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

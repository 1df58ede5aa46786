//! Where a workspace path really leads: resolved component by component, symlinks followed
//! (dangling ones included), so that the engine never writes, moves or deletes anything outside
//! the workspace, whatever links the workspace holds.

use std::path::{Component, Path, PathBuf};

/// How many symlinks one resolution may follow before it is called a loop (Linux's limit).
const MAX_LINKS: usize = 40;

/// A path the engine must not touch.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("`{path}` resolves to {}, outside the workspace {}; refusing to write, move or delete it", resolved.display(), root.display())]
    Escapes {
        path: String,
        resolved: PathBuf,
        root: PathBuf,
    },
    #[error("`{path}`: symlink loop at {}", at.display())]
    Loop { path: String, at: PathBuf },
    #[error("`{path}`: cannot resolve {}: {source}", at.display())]
    Io {
        path: String,
        at: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The folders engine writes may resolve into: the workspace root, and artifacts/ wherever it
/// leads (it may be a link to a larger disk).
pub struct Fence {
    root: PathBuf,
    inside: Vec<PathBuf>,
}

impl Fence {
    pub fn new(root: &Path, artifacts: &Path) -> Result<Fence, PathError> {
        let shown = root.display().to_string();
        let canonical_root = resolve(root, &shown)?;
        let mut inside = vec![canonical_root.clone()];
        let artifacts = resolve(artifacts, &shown)?;
        if !artifacts.starts_with(&canonical_root) {
            inside.push(artifacts);
        }
        Ok(Fence {
            root: canonical_root,
            inside,
        })
    }

    /// Ok when `rel` (relative to the workspace root) resolves inside the fence.
    pub fn check(&self, rel: &str) -> Result<PathBuf, PathError> {
        let resolved = resolve_from(&self.root, Path::new(rel), rel)?;
        if self.inside.iter().any(|dir| resolved.starts_with(dir)) {
            Ok(resolved)
        } else {
            Err(PathError::Escapes {
                path: rel.to_string(),
                resolved,
                root: self.root.clone(),
            })
        }
    }
}

/// `path` made absolute with every symlink followed, `..` applied to what it resolved to,
/// and components that do not exist (yet) kept as written.
pub fn resolve(path: &Path, shown: &str) -> Result<PathBuf, PathError> {
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|source| PathError::Io {
                path: shown.to_string(),
                at: path.to_path_buf(),
                source,
            })?
            .join(path)
    };
    resolve_from(Path::new("/"), &absolute, shown)
}

/// [`resolve`] of `path` taken relative to `base`, a path already resolved (no symlinks in
/// it), so only `path`'s own components cost a lookup each.
fn resolve_from(base: &Path, path: &Path, shown: &str) -> Result<PathBuf, PathError> {
    let mut links = 0;
    let mut resolved = base.to_path_buf();
    let mut pending: Vec<std::ffi::OsString> = path
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(s) => Some(s.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    while let Some(part) = pending.pop() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        let next = resolved.join(&part);
        match std::fs::symlink_metadata(&next) {
            Ok(meta) if meta.file_type().is_symlink() => {
                links += 1;
                if links > MAX_LINKS {
                    return Err(PathError::Loop {
                        path: shown.to_string(),
                        at: next,
                    });
                }
                let target = std::fs::read_link(&next).map_err(|source| PathError::Io {
                    path: shown.to_string(),
                    at: next.clone(),
                    source,
                })?;
                if target.is_absolute() {
                    resolved = PathBuf::from("/");
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(s) => pending.push(s.to_os_string()),
                        Component::ParentDir => pending.push("..".into()),
                        _ => {}
                    }
                }
            }
            _ => resolved = next,
        }
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn links_out_of_the_workspace_are_refused_links_inside_are_not() {
        let outer = tempfile::tempdir().unwrap();
        let ws = outer.path().join("ws");
        let outside = outer.path().join("outside");
        std::fs::create_dir_all(ws.join("artifacts")).unwrap();
        std::fs::create_dir_all(ws.join("data")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        symlink(&outside, ws.join("lnk")).unwrap();
        symlink("data", ws.join("inner")).unwrap();
        symlink("../outside/x", ws.join("dangling")).unwrap();
        symlink("loop", ws.join("loop")).unwrap();
        let fence = Fence::new(&ws, &ws.join("artifacts")).unwrap();
        assert!(matches!(
            fence.check("lnk/keep.txt"),
            Err(PathError::Escapes { .. })
        ));
        assert!(matches!(
            fence.check("dangling"),
            Err(PathError::Escapes { .. })
        ));
        assert!(matches!(
            fence.check("data/../../x"),
            Err(PathError::Escapes { .. })
        ));
        assert!(fence.check("inner/new/file.txt").is_ok());
        assert!(fence.check("not/yet/there").is_ok());
        let err = fence
            .check("loop/x")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("symlink loop") && err.contains("loop"),
            "{err}"
        );
    }

    #[test]
    fn artifacts_may_live_elsewhere() {
        let outer = tempfile::tempdir().unwrap();
        let ws = outer.path().join("ws");
        let disk = outer.path().join("disk");
        std::fs::create_dir_all(&ws).unwrap();
        std::fs::create_dir_all(&disk).unwrap();
        symlink(&disk, ws.join("artifacts")).unwrap();
        let fence = Fence::new(&ws, &ws.join("artifacts")).unwrap();
        assert!(fence.check("artifacts/train/model.bin").is_ok());
    }
}

//! The path rules of a pipeline: outputs and deps are normalized workspace-relative paths
//! that stay inside it, no two stages write one path, the engine's own files are never
//! outputs, and `deps` inside another stage's outputs order the two.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path};

use super::source::{Entry, Source};
use super::{Stage, ARTIFACTS_DIR};
use crate::error::{suggestion, PipeError};

/// Normalizes workspace-relative paths and rejects ones that leave the workspace.
pub(super) fn clean_paths(
    src: &Source,
    entry: &Entry,
    stage: &str,
    key: &str,
    paths: Vec<String>,
) -> Result<Vec<String>, PipeError> {
    paths
        .into_iter()
        .map(|p| {
            let path = Path::new(&p);
            let mut parts = Vec::new();
            for c in path.components() {
                match c {
                    Component::Normal(s) => parts.push(s.to_string_lossy().into_owned()),
                    Component::CurDir => {}
                    _ => {
                        return Err(src.error(
                            entry.value_span.as_ref(),
                            format!("`{key}` of stage `{stage}`: `{p}` must be a relative path inside the workspace"),
                        ))
                    }
                }
            }
            if parts.is_empty() {
                return Err(src.error(entry.value_span.as_ref(), format!("`{key}` of stage `{stage}`: empty path")));
            }
            let joined = parts.join("/");
            let engine_owned = joined == ARTIFACTS_DIR
                || joined.starts_with(&format!("{ARTIFACTS_DIR}/."))
                || src.reserved.iter().any(|r| paths_overlap(&joined, r));
            if key == "outs" && engine_owned {
                return Err(src.error(
                    entry.value_span.as_ref(),
                    format!("`outs` of stage `{stage}`: `{p}` is reserved for the engine (the pipeline file, its lock, artifacts/ and its hidden folders)"),
                ));
            }
            Ok(joined)
        })
        .collect()
}

/// True when one path is the other or lies inside it.
pub fn paths_overlap(a: &str, b: &str) -> bool {
    let inside = |x: &str, dir: &str| {
        x.len() > dir.len() && x.starts_with(dir) && x.as_bytes()[dir.len()] == b'/'
    };
    a == b || inside(a, b) || inside(b, a)
}

/// The entries of `owners` strictly inside folder `dir`.
fn inside_of<'a>(
    owners: &'a BTreeMap<String, String>,
    dir: &str,
) -> impl Iterator<Item = (&'a String, &'a String)> {
    // Every "dir/..." sorts between "dir/" and "dir0" ('0' follows '/').
    owners.range(format!("{dir}/")..format!("{dir}0"))
}

/// `path` and every folder above it: "a/b/c" -> "a/b/c", "a/b", "a".
fn path_and_parents(path: &str) -> impl Iterator<Item = &str> {
    std::iter::successors(Some(path), |p| p.rfind('/').map(|i| &p[..i]))
}

/// Checks `needs`, derives ordering from `deps`, and rejects two stages writing one path.
pub(super) fn resolve_links(src: &Source, stages: &mut [Stage]) -> Result<(), PipeError> {
    let names: BTreeSet<String> = stages.iter().map(|s| s.name.clone()).collect();
    // Every output root and its stage, sorted: overlaps are found through each path's
    // parents and a range scan, not by comparing every pair (a long pipeline was quadratic).
    let mut owners: BTreeMap<String, String> = BTreeMap::new();
    for stage in stages.iter() {
        for out in stage.out_roots() {
            let clash = path_and_parents(&out)
                .find_map(|p| owners.get(p).map(|o| (p.to_string(), o.clone())))
                .or_else(|| {
                    inside_of(&owners, &out)
                        .next()
                        .map(|(p, o)| (p.clone(), o.clone()))
                });
            if let Some((path, other)) = clash {
                let longer = if path.len() > out.len() { path } else { out };
                return Err(src.error(
                    None,
                    format!(
                        "stages `{other}` and `{}` both write `{longer}`",
                        stage.name
                    ),
                ));
            }
            owners.insert(out, stage.name.clone());
        }
    }
    for stage in stages.iter_mut() {
        for need in &stage.needs {
            if !names.contains(need) {
                return Err(PipeError::Config(format!(
                    "{}: stage `{}` needs `{need}`, which is no stage{}",
                    stage.needs_at,
                    stage.name,
                    suggestion(need, names.iter().map(String::as_str))
                )));
            }
        }
        let mut after: Vec<String> = Vec::new();
        for dep in stage.deps() {
            let upstream_owners = path_and_parents(dep)
                .filter_map(|p| owners.get(p))
                .chain(inside_of(&owners, dep).map(|(_, o)| o));
            for owner in upstream_owners {
                if *owner != stage.name && !stage.needs.contains(owner) && !after.contains(owner) {
                    after.push(owner.clone());
                }
            }
        }
        stage.after = after;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_is_same_path_or_inside_on_component_boundaries() {
        assert!(paths_overlap("a/b", "a/b"));
        assert!(paths_overlap("a", "a/b/c"));
        assert!(paths_overlap("a/b/c", "a"));
        assert!(!paths_overlap("a/b", "a/bc"));
        assert!(!paths_overlap("ab", "a"));
    }

    #[test]
    fn parents_are_listed_from_the_path_up() {
        let all: Vec<&str> = path_and_parents("a/b/c").collect();
        assert_eq!(all, ["a/b/c", "a/b", "a"]);
    }
}

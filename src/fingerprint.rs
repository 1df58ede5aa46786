//! A stage's fingerprint: blake3 over everything that decides its outputs. Two runs with
//! the same fingerprint must produce the same outputs; anything that can change the outputs
//! must be in it, and nothing else (or a change that cannot matter reruns the stage).
//!
//! | What | Treatment | Why |
//! |---|---|---|
//! | kind name | hashed | a different kind computes something else |
//! | kind `VERSION` | hashed | bumped when the kind's code changes its outputs |
//! | params, defaults filled in | hashed, canonical (key order, formatting, comments, unset options do not count; `1` is not `1.0`) | they decide the outputs |
//! | a kind's unhashed params (download's mirrors, ...) | recorded in the lock only | where bytes come from, not which bytes |
//! | pipeline `seed` | hashed, built-in stages only | it decides weights and shuffles; commands never see it |
//! | each upstream stage's outputs | hashed as their content digest (path + blake3 per file) | a consumer reruns only when what it reads changed (early cutoff) |
//! | a kind's unhashed outputs (train's timings.json) | kept out of that digest; published, cached, checked | wall-clock figures differ on every run of identical bytes |
//! | `deps` files of a command stage | hashed by content (path + blake3) | they are its inputs |
//! | file mtimes and sizes | not hashed; only let an unchanged file skip rehashing | a touch is not a change |
//! | `cmd` of a command stage | hashed (it is a param) | it is the computation |
//! | device, kernels, CPU vector level (AVX-512 / AVX2, `FMNIST_CPU`), runner, run time, metrics | recorded in the lock only (the level in train's metrics) | same inputs, same results within tolerance; where it ran is history |
//! | `[cache]` table (remote, push, required, endpoint) and AWS credentials | neither hashed nor recorded | where results are shared does not change them; a workspace with another remote (or none) still restores the same fingerprints |
//! | this recipe's layout (`RECIPE`) | hashed | bumped when this table changes, so old locks read stale |
//!
//! A stage's *lineage* ([`lineage`]) is the same recipe with the kind's progress params
//! (train's `epochs`) left out: runs that differ only in how far they go share it, and with
//! it a continuation folder where a longer run finds the end state of a shorter one.
//!
//! When to bump a kind's `VERSION`: whenever the same params and inputs would give different
//! output bytes (a numeric change, a new or renamed output file, a format change) or a
//! param's meaning changes. Not for speed-ups that keep the bytes.

use std::collections::BTreeMap;

use crate::config::{Pipeline, Stage};
use crate::reason::Reason;

/// Bumped when the fingerprint recipe itself changes, so old locks read as stale.
const RECIPE: &str = "fmnist-pipe fingerprint v1";

/// Everything that decides a stage's outputs.
#[derive(Clone, Copy)]
pub struct Recipe<'a> {
    pub kind: &'a str,
    pub version: u32,
    pub params: &'a serde_json::Value,
    /// The pipeline seed, for built-in stages (command stages do not see it).
    pub seed: Option<u64>,
    /// Upstream stage name -> content hash of its outputs.
    pub upstream: &'a BTreeMap<String, String>,
    /// Content hash of every `deps` path (see `manifest::digest`).
    pub deps_digest: &'a str,
}

/// A stage's fingerprint, from the pipeline's seed, its upstream stages' output digests and
/// the digest of its deps.
pub fn of_stage(
    pipeline: &Pipeline,
    stage: &Stage,
    upstream: &BTreeMap<String, String>,
    deps_digest: &str,
) -> String {
    fingerprint(&Recipe {
        kind: stage.kind_name(),
        version: stage.version(),
        params: &stage.hashed_params,
        seed: stage.is_builtin().then_some(pipeline.seed),
        upstream,
        deps_digest,
    })
}

/// The stage's lineage: its fingerprint with the kind's progress params left out, or None
/// when its kind has none (command stages, most kinds). Runs with equal lineages differ only
/// in how far they go, so the first part of the longer one is the whole of the shorter one.
pub fn lineage(
    pipeline: &Pipeline,
    stage: &Stage,
    upstream: &BTreeMap<String, String>,
    deps_digest: &str,
) -> Option<String> {
    let crate::config::Body::Builtin {
        progress_params, ..
    } = &stage.body
    else {
        return None;
    };
    if progress_params.is_empty() {
        return None;
    }
    let mut params = stage.hashed_params.clone();
    if let Some(map) = params.as_object_mut() {
        for key in *progress_params {
            map.remove(*key);
        }
    }
    let kind = format!("{} lineage", stage.kind_name());
    Some(fingerprint(&Recipe {
        kind: &kind,
        version: stage.version(),
        params: &params,
        seed: Some(pipeline.seed),
        upstream,
        deps_digest,
    }))
}

pub fn fingerprint(recipe: &Recipe) -> String {
    let mut h = blake3::Hasher::new();
    let mut field = |name: &str, value: &str| {
        // Length-prefixed, so no two different field sequences hash alike.
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(&(value.len() as u64).to_le_bytes());
        h.update(value.as_bytes());
    };
    field("recipe", RECIPE);
    field("kind", recipe.kind);
    field("version", &recipe.version.to_string());
    field("params", &canonical(recipe.params));
    if let Some(seed) = recipe.seed {
        field("seed", &seed.to_string());
    }
    for (stage, hash) in recipe.upstream {
        field("upstream", stage);
        field("hash", hash);
    }
    field("deps", recipe.deps_digest);
    h.finalize().to_hex().to_string()
}

/// A canonical text form of a JSON value: object keys sorted, nulls (unset options) dropped,
/// integers and floats kept apart.
pub fn canonical(value: &serde_json::Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &serde_json::Value, out: &mut String) {
    use serde_json::Value;
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.push_str(&i.to_string());
            } else if let Some(u) = n.as_u64() {
                out.push_str(&u.to_string());
            } else {
                // `{:?}` always keeps a `.` or exponent, so 1.0 never collides with 1.
                out.push_str(&format!("{:?}", n.as_f64().unwrap_or(f64::NAN)));
            }
        }
        Value::String(s) => out.push_str(&serde_json::Value::String(s.clone()).to_string()),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, _)| k)
                .collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String((*key).clone()).to_string());
                out.push(':');
                write_canonical(&map[*key], out);
            }
            out.push('}');
        }
    }
}

/// Differences between two param trees, one reason per changed leaf ("path: old -> new").
pub fn diff_params(
    prefix: &str,
    old: &serde_json::Value,
    new: &serde_json::Value,
    out: &mut Vec<Reason>,
) {
    use serde_json::Value;
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for key in keys {
                let path = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                let a = a.get(key).unwrap_or(&Value::Null);
                let b = b.get(key).unwrap_or(&Value::Null);
                diff_params(&path, a, b, out);
            }
        }
        (a, b) if canonical(a) != canonical(b) => {
            let show = |v: &Value| (!v.is_null()).then(|| v.to_string());
            out.push(Reason::ParamChanged {
                param: prefix.to_string(),
                from: show(a),
                to: show(b),
            });
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn recipe_hash(params: &serde_json::Value) -> String {
        let upstream = BTreeMap::new();
        fingerprint(&Recipe {
            kind: "train",
            version: 1,
            params,
            seed: Some(42),
            upstream: &upstream,
            deps_digest: "",
        })
    }

    #[test]
    fn key_order_does_not_matter() {
        let a = json!({"lr": 0.1, "opt": {"name": "adam", "beta": 0.9}, "epochs": 5});
        let b = json!({"epochs": 5, "opt": {"beta": 0.9, "name": "adam"}, "lr": 0.1});
        assert_eq!(canonical(&a), canonical(&b));
        assert_eq!(recipe_hash(&a), recipe_hash(&b));
    }

    #[test]
    fn values_and_types_matter() {
        assert_ne!(
            recipe_hash(&json!({"lr": 0.1})),
            recipe_hash(&json!({"lr": 0.01}))
        );
        assert_ne!(
            recipe_hash(&json!({"epochs": 1})),
            recipe_hash(&json!({"epochs": 1.0}))
        );
        assert_ne!(
            recipe_hash(&json!({"name": "1"})),
            recipe_hash(&json!({"name": 1}))
        );
        assert_ne!(
            recipe_hash(&json!({"a": [1, 2]})),
            recipe_hash(&json!({"a": [2, 1]}))
        );
    }

    #[test]
    fn unset_options_equal_absent_keys() {
        assert_eq!(
            canonical(&json!({"a": 1, "b": null})),
            canonical(&json!({"a": 1}))
        );
    }

    #[test]
    fn toml_formatting_and_comments_do_not_matter() {
        let a: toml::Table = toml::from_str("lr = 1e-4\nepochs = 5\n[opt]\nname = 'adam'").unwrap();
        let b: toml::Table =
            toml::from_str("# tuned\nopt = { name = \"adam\" }\nepochs=5\nlr = 0.0001 # small")
                .unwrap();
        let a = serde_json::to_value(a).unwrap();
        let b = serde_json::to_value(b).unwrap();
        assert_eq!(recipe_hash(&a), recipe_hash(&b));
    }

    #[test]
    fn every_recipe_field_counts() {
        let params = json!({});
        let other_params = json!({"lr": 1});
        let none = BTreeMap::new();
        let mut up = BTreeMap::new();
        up.insert("a".to_string(), "00".to_string());
        let base = Recipe {
            kind: "k",
            version: 1,
            params: &params,
            seed: Some(1),
            upstream: &none,
            deps_digest: "",
        };
        let h = fingerprint(&base);
        let variants = [
            Recipe { kind: "j", ..base },
            Recipe { version: 2, ..base },
            Recipe {
                params: &other_params,
                ..base
            },
            Recipe {
                seed: Some(2),
                ..base
            },
            Recipe { seed: None, ..base },
            Recipe {
                upstream: &up,
                ..base
            },
            Recipe {
                deps_digest: "x",
                ..base
            },
        ];
        for (i, v) in variants.iter().enumerate() {
            assert_ne!(h, fingerprint(v), "variant {i} must change the fingerprint");
        }
    }

    #[test]
    fn diff_names_changed_paths() {
        let mut out = Vec::new();
        diff_params(
            "params",
            &json!({"lr": 0.0001, "opt": {"name": "adam"}}),
            &json!({"lr": 0.001, "opt": {"name": "adam"}, "x": 1}),
            &mut out,
        );
        let shown: Vec<String> = out.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            vec!["params.lr: 0.0001 -> 0.001", "params.x: (unset) -> 1"]
        );
    }
}

//! `run --sweep`: each `--set STAGE.KEY=V1,V2,...` is a list of values (split on the commas
//! outside quotes and brackets); the grid (cartesian product) runs one combination after
//! another, each an ordinary run with those overrides and so an experiment. The stages the
//! combinations share are computed once: later combinations find them up to date or in the
//! run cache. At the end the workspace goes back to its own params (restored from the run
//! cache when every stage of that state is there; pipeline.toml is never written). A
//! combination whose stage fails does not stop the others (the sweep then exits 1); Ctrl-C
//! stops the sweep where it is.

use std::path::Path;

use crate::config::Override;
use crate::error::PipeError;
use crate::registry::Registry;
use crate::workspace::Workspace;

/// Runs one combination: its `--set`s and name; returns the recorded experiment's name.
pub type RunOne<'a> = dyn FnMut(&[String], Option<&str>) -> Result<String, PipeError> + 'a;

/// `1e-3,3e-4` -> [`1e-3`, `3e-4`]; commas inside quotes, `[]` and `{}` do not split.
pub fn split_values(rhs: &str) -> Vec<String> {
    let mut values = Vec::new();
    let mut current = String::new();
    let mut depth = 0i32;
    let mut quote: Option<char> = None;
    for c in rhs.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'') => quote = Some(c),
            (None, '[' | '{') => depth += 1,
            (None, ']' | '}') => depth -= 1,
            (None, ',') if depth == 0 => {
                values.push(current.trim().to_string());
                current.clear();
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    values.push(current.trim().to_string());
    values
}

/// The grid: every combination of the `--set` value lists, as `--set` strings, in order
/// (the last `--set` varies fastest).
pub fn grid(sets: &[String]) -> Result<Vec<Vec<String>>, PipeError> {
    let mut combos: Vec<Vec<String>> = vec![Vec::new()];
    for set in sets {
        let (lhs, rhs) = set.split_once('=').ok_or_else(|| {
            PipeError::Config(format!(
                "malformed --set `{set}`: no `=` (expected STAGE.KEY=V1,V2,...)"
            ))
        })?;
        let values = split_values(rhs);
        if let Some(empty) = values.iter().position(String::is_empty) {
            return Err(PipeError::Config(format!(
                "--set `{set}`: value {} of the sweep is empty",
                empty + 1
            )));
        }
        combos = combos
            .into_iter()
            .flat_map(|c| {
                values.iter().map(move |v| {
                    let mut c = c.clone();
                    c.push(format!("{}={v}", lhs.trim()));
                    c
                })
            })
            .collect();
    }
    Ok(combos)
}

/// The whole sweep. Every combination is checked (parsed and validated against the
/// pipeline) before the first runs, so a bad value stops it with nothing run.
pub fn run(
    file: &Path,
    sets: &[String],
    name: Option<&str>,
    run_one: &mut RunOne,
    say: &dyn Fn(&str),
) -> Result<(), PipeError> {
    if sets.is_empty() {
        return Err(PipeError::Config(
            "--sweep needs at least one --set STAGE.KEY=V1,V2,...".to_string(),
        ));
    }
    let combos = grid(sets)?;
    for combo in &combos {
        let overrides: Vec<Override> = combo.iter().map(|s| s.parse()).collect::<Result<_, _>>()?;
        Workspace::load(file, &overrides, Registry::builtins())
            .map_err(|e| PipeError::Config(format!("sweep {}: {e}", combo.join(" "))))?;
    }
    let mut names = Vec::new();
    let mut failed = None;
    let mut failures = Vec::new();
    for (i, combo) in combos.iter().enumerate() {
        say(&format!(
            "sweep {}/{}: {}",
            i + 1,
            combos.len(),
            combo.join(" ")
        ));
        let this_name = name.map(|n| format!("{n}-{}", i + 1));
        match run_one(combo, this_name.as_deref()) {
            Ok(n) => names.push(n),
            // A failed stage fails its combination only; the others still run.
            Err(PipeError::StageFailed(message)) => {
                say(&format!(
                    "sweep {}/{}: failed: {message}",
                    i + 1,
                    combos.len()
                ));
                failures.push(combo.join(" "));
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    if let Some(e @ PipeError::Interrupted) = failed {
        return Err(e);
    }
    // Back to the workspace's own params.
    let ws = Workspace::load(file, &[], Registry::builtins())?;
    let missing = super::not_restorable(&ws);
    drop(ws);
    if missing.is_empty() {
        say("sweep: putting the workspace back on its own params (pipeline.toml)");
        run_one(&[], None)?;
    } else {
        say(&format!(
            "sweep: the workspace's own params have never run for {}: its outputs are the \
             last combination's until `fmnist-pipe run`",
            missing.join(", ")
        ));
    }
    if let Some(e) = failed {
        return Err(e);
    }
    if !failures.is_empty() {
        return Err(PipeError::StageFailed(format!(
            "sweep: {} of {} combinations failed: {}",
            failures.len(),
            combos.len(),
            failures.join("; ")
        )));
    }
    say(&format!(
        "sweep: {} experiment{}: {} (`fmnist-pipe exp show` compares them)",
        names.len(),
        if names.len() == 1 { "" } else { "s" },
        names.join(", ")
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_split_on_top_level_commas() {
        assert_eq!(split_values("1e-3, 3e-4"), ["1e-3", "3e-4"]);
        assert_eq!(split_values("[1,2],[3]"), ["[1,2]", "[3]"]);
        assert_eq!(split_values("'a,b',\"c\""), ["'a,b'", "\"c\""]);
        assert_eq!(
            split_values("{ name = \"adam\", lr = 1e-3 },{ name = \"sgd\", lr = 0.1 }").len(),
            2
        );
        assert_eq!(split_values("5"), ["5"]);
    }

    #[test]
    fn the_grid_is_the_cartesian_product() {
        let g = grid(&["t.lr=1,2".to_string(), "t.epochs=3,5,7".to_string()]).unwrap();
        assert_eq!(g.len(), 6);
        assert_eq!(g[0], ["t.lr=1", "t.epochs=3"]);
        assert_eq!(g[5], ["t.lr=2", "t.epochs=7"]);
        assert!(grid(&["t.lr=1,,2".to_string()]).is_err());
        assert!(grid(&["t.lr".to_string()]).is_err());
    }
}

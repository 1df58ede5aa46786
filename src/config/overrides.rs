//! `--set TABLE.KEY=VALUE` overrides: parsed from the command line and applied to the
//! file's tables before validation, so an override is checked like a value in the file.

use super::source::{Entries, Entry};
use super::MAX_SET_DEPTH;
use crate::error::PipeError;

/// One `--set STAGE.KEY=VALUE` (or `--set pipeline.KEY=VALUE`).
#[derive(Debug, Clone)]
pub struct Override {
    pub raw: String,
    pub table: String,
    pub key_path: Vec<String>,
    pub value: toml::Value,
}

impl std::str::FromStr for Override {
    type Err = PipeError;

    fn from_str(raw: &str) -> Result<Self, PipeError> {
        let malformed = |why: &str| {
            PipeError::Config(format!(
                "malformed --set `{raw}`: {why} (expected STAGE.KEY=VALUE, e.g. train.epochs=3)"
            ))
        };
        let (lhs, rhs) = raw.split_once('=').ok_or_else(|| malformed("no `=`"))?;
        let (table, key) = lhs
            .trim()
            .split_once('.')
            .ok_or_else(|| malformed("no `.` between stage and key"))?;
        let key_path: Vec<String> = key.split('.').map(|k| k.trim().to_string()).collect();
        if table.trim().is_empty() || key_path.iter().any(|k| k.is_empty()) {
            return Err(malformed("empty stage or key name"));
        }
        // Each part nests a table: tens of thousands overflowed the stack when freed.
        if key_path.len() > MAX_SET_DEPTH {
            return Err(malformed(&format!(
                "a key path of {} parts (at most {MAX_SET_DEPTH})",
                key_path.len()
            )));
        }
        let rhs = rhs.trim();
        if rhs.is_empty() {
            return Err(malformed("no value after `=`"));
        }
        let value = match toml::from_str::<toml::Table>(&format!("v = {rhs}")) {
            Ok(mut t) => t.remove("v").ok_or_else(|| malformed("no value"))?,
            // A bare word (`device=cpu`) is taken as a string; anything that looks like it
            // meant to be TOML (quotes, arrays, tables) must parse.
            Err(_)
                if !rhs.starts_with(['"', '\'', '[', '{'])
                    && !rhs.contains(char::is_whitespace) =>
            {
                toml::Value::String(rhs.to_string())
            }
            Err(e) => return Err(malformed(&format!("value is not TOML: {}", e.message()))),
        };
        Ok(Override {
            raw: raw.to_string(),
            table: table.trim().to_string(),
            key_path,
            value,
        })
    }
}

pub(super) fn apply_override(target: &mut Entries, o: &Override) -> Result<(), PipeError> {
    let (first, rest) = o
        .key_path
        .split_first()
        .ok_or_else(|| PipeError::Config(format!("malformed --set `{}`", o.raw)))?;
    if rest.is_empty() {
        target.insert(
            first.clone(),
            Entry {
                value: o.value.clone(),
                key_span: None,
                value_span: None,
                from_override: Some(o.raw.clone()),
            },
        );
        return Ok(());
    }
    let entry = target.entry(first.clone()).or_insert_with(|| Entry {
        value: toml::Value::Table(toml::Table::new()),
        key_span: None,
        value_span: None,
        from_override: Some(o.raw.clone()),
    });
    entry.from_override = Some(o.raw.clone());
    let mut node = &mut entry.value;
    for key in rest {
        let table = node.as_table_mut().ok_or_else(|| {
            PipeError::Config(format!(
                "--set `{}`: `{key}`'s parent is not a table",
                o.raw
            ))
        })?;
        node = table
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    }
    *node = o.value.clone();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(raw: &str) -> Override {
        raw.parse().unwrap_or_else(|e| panic!("{raw}: {e}"))
    }

    #[test]
    fn parses_table_key_path_and_toml_value() {
        let o = parsed("train-resnet.optimizer.lr=3e-4");
        assert_eq!(o.table, "train-resnet");
        assert_eq!(o.key_path, ["optimizer", "lr"]);
        assert_eq!(o.value.as_float(), Some(3e-4));
        assert_eq!(parsed("pipeline.device=cpu").value.as_str(), Some("cpu"));
        assert_eq!(
            parsed("s.xs=[1, 2]").value.as_array().map(Vec::len),
            Some(2)
        );
    }

    #[test]
    fn malformed_sets_say_what_is_wrong() {
        for (raw, why) in [
            ("train.epochs", "no `=`"),
            ("epochs=3", "no `.`"),
            ("train.=3", "empty stage or key name"),
            ("train.epochs=", "no value"),
            ("train.name='unclosed", "not TOML"),
        ] {
            let err = raw.parse::<Override>().expect_err(raw).to_string();
            assert!(err.contains(why), "{raw}: {err}");
            assert!(err.contains("expected STAGE.KEY=VALUE"), "{raw}: {err}");
        }
        let deep = format!("s.{}=1", vec!["k"; MAX_SET_DEPTH + 1].join("."));
        assert!(deep.parse::<Override>().is_err());
    }

    #[test]
    fn applying_nests_into_tables_and_marks_the_origin() {
        let mut target = Entries::new();
        apply_override(&mut target, &parsed("s.optimizer.lr=0.1")).unwrap();
        let entry = &target["optimizer"];
        assert_eq!(entry.value["lr"].as_float(), Some(0.1));
        assert_eq!(entry.from_override.as_deref(), Some("s.optimizer.lr=0.1"));
        apply_override(&mut target, &parsed("s.epochs=3")).unwrap();
        let err = apply_override(&mut target, &parsed("s.epochs.inner=1")).unwrap_err();
        assert!(err.to_string().contains("parent is not a table"), "{err}");
    }
}

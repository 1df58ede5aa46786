//! Where things are in pipeline.toml: the file's text with its line index, every value with
//! its span (or the `--set` it came from), and the errors that point at file:line.

use std::collections::BTreeMap;
use std::ops::Range;

use serde::Deserialize;
use toml::Spanned;

use crate::error::{suggestion, PipeError};

/// The text of pipeline.toml, kept to turn byte spans into line numbers.
pub(super) struct Source {
    pub(super) shown: String,
    pub(super) text: String,
    /// Workspace paths no stage may write: the pipeline file and its lock.
    pub(super) reserved: Vec<String>,
    /// Byte offset of each line's start, for span -> line in O(log n).
    pub(super) line_starts: Vec<usize>,
}

impl Source {
    pub(super) fn at(&self, span: Option<&Range<usize>>) -> String {
        match span {
            Some(span) => {
                let line = self.line_starts.partition_point(|&s| s <= span.start);
                format!("{}:{}", self.shown, line.max(1))
            }
            None => self.shown.clone(),
        }
    }

    pub(super) fn error(
        &self,
        span: Option<&Range<usize>>,
        msg: impl std::fmt::Display,
    ) -> PipeError {
        PipeError::Config(format!("{}: {msg}", self.at(span)))
    }

    pub(super) fn toml_error(&self, e: &toml::de::Error) -> PipeError {
        let msg = e.message().trim().replace('\n', " ");
        self.error(e.span().as_ref(), msg)
    }
}

pub(super) type SpannedTable = BTreeMap<Spanned<String>, Spanned<toml::Value>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDoc {
    #[serde(default)]
    pub(super) pipeline: Option<SpannedTable>,
    #[serde(default)]
    pub(super) cache: Option<SpannedTable>,
    #[serde(default)]
    pub(super) stages: Option<BTreeMap<Spanned<String>, SpannedTable>>,
}

/// A value with where it was written (None for a value from `--set`).
pub(super) struct Entry {
    pub(super) value: toml::Value,
    pub(super) key_span: Option<Range<usize>>,
    pub(super) value_span: Option<Range<usize>>,
    pub(super) from_override: Option<String>,
}

pub(super) type Entries = BTreeMap<String, Entry>;

pub(super) fn entries(table: SpannedTable) -> Entries {
    table
        .into_iter()
        .map(|(k, v)| {
            let key_span = Some(k.span());
            let value_span = Some(v.span());
            (
                k.into_inner(),
                Entry {
                    value: v.into_inner(),
                    key_span,
                    value_span,
                    from_override: None,
                },
            )
        })
        .collect()
}

pub(super) fn wrong_type(
    src: &Source,
    entry: &Entry,
    table: &str,
    key: &str,
    expected: &str,
) -> PipeError {
    let origin = match &entry.from_override {
        Some(raw) => format!(" (from --set `{raw}`)"),
        None => String::new(),
    };
    src.error(
        entry.value_span.as_ref(),
        format!(
            "`{key}` in {table} must be {expected}, found {}{origin}",
            entry.value.type_str()
        ),
    )
}

/// Places a kind's validation message on the line of the key (or value) it names.
pub(super) fn params_error(
    src: &Source,
    stage: &str,
    span: &Range<usize>,
    e: &Entries,
    kind: &str,
    msg: &str,
) -> PipeError {
    let names: Vec<&str> = msg.split('`').skip(1).step_by(2).collect();
    let mut at = Some(span.clone());
    let mut hint = String::new();
    if let Some(first) = names.first() {
        if let Some(entry) = e.get(*first) {
            at = entry.key_span.clone().or(at);
        } else if let Some(entry) = e.values().find(|v| {
            v.value_span
                .as_ref()
                .is_some_and(|s| src.text.get(s.clone()).is_some_and(|t| t.contains(first)))
        }) {
            at = entry.value_span.clone();
        }
        if msg.starts_with("unknown field") && !msg.contains("did you mean") {
            hint = suggestion(first, names.iter().skip(1).copied());
        }
    }
    src.error(
        at.as_ref(),
        format!("stage `{stage}` (kind `{kind}`): {msg}{hint}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_become_file_and_line() {
        let text = "a = 1\nb = 2\n\nc = 3\n".to_string();
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        let src = Source {
            shown: "pipeline.toml".into(),
            text: text.clone(),
            reserved: vec![],
            line_starts,
        };
        let c = text.find('c').unwrap();
        assert_eq!(src.at(Some(&(c..c + 1))), "pipeline.toml:4");
        assert_eq!(src.at(Some(&(0..1))), "pipeline.toml:1");
        assert_eq!(src.at(None), "pipeline.toml");
        let err = src.error(Some(&(6..7)), "bad");
        assert_eq!(err.to_string(), "pipeline.toml:2: bad");
    }
}

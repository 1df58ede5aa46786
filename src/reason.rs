//! Why a stage must run, as data: one variant per cause (like cargo's `DirtyReason`),
//! rendered as text in exactly one place (`Display`) and as tagged JSON for `status --json`.
//! The plan produces them; the console, `status` and `run --dry-run` only render them.

use std::fmt;

use serde::Serialize;

/// Which side of a stage a file belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileSide {
    Dep,
    Output,
}

/// How a file differs from the lock's record of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileChange {
    Added,
    Modified,
    Missing,
}

/// One cause for running a stage.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Reason {
    /// No lock entry: the stage never ran in this workspace (or was cleaned).
    NeverRun,
    /// `run --force`.
    Forced,
    /// An upstream stage will run first, so this one's inputs are not known yet.
    UpstreamStale {
        stage: String,
    },
    KindChanged {
        from: String,
        to: String,
    },
    /// The kind's implementation VERSION changed (its outputs would differ).
    VersionChanged {
        kind: String,
        from: u32,
        to: u32,
    },
    /// A hashed param changed; values are JSON text, `None` when unset.
    ParamChanged {
        param: String,
        from: Option<String>,
        to: Option<String>,
    },
    SeedChanged {
        from: Option<u64>,
        to: u64,
    },
    /// The content of an upstream stage's outputs changed.
    InputChanged {
        stage: String,
    },
    InputRemoved {
        stage: String,
    },
    File {
        side: FileSide,
        change: FileChange,
        path: String,
    },
    /// The outputs differ from the lock in a way no single file explains.
    OutputsChanged,
    /// Nothing recorded differs, so the fingerprint recipe itself changed (a new version of
    /// this tool).
    RecipeChanged,
    /// Deps or outputs could not be read; the stage is treated as stale.
    Unreadable {
        side: FileSide,
        error: String,
    },
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let side = |s: &FileSide| match s {
            FileSide::Dep => "dep",
            FileSide::Output => "output",
        };
        let unset = |v: &Option<String>| v.clone().unwrap_or_else(|| "(unset)".to_string());
        match self {
            Reason::NeverRun => write!(f, "never run"),
            Reason::Forced => write!(f, "forced"),
            Reason::UpstreamStale { stage } => write!(f, "upstream `{stage}` is stale"),
            Reason::KindChanged { from, to } => write!(f, "kind: {from} -> {to}"),
            Reason::VersionChanged { kind, from, to } => {
                write!(f, "kind `{kind}` version: {from} -> {to}")
            }
            Reason::ParamChanged { param, from, to } => {
                write!(f, "{param}: {} -> {}", unset(from), unset(to))
            }
            Reason::SeedChanged { from, to } => {
                let from = from.map_or_else(|| "(unset)".to_string(), |s| s.to_string());
                write!(f, "seed: {from} -> {to}")
            }
            Reason::InputChanged { stage } => write!(f, "input changed: outputs of `{stage}`"),
            Reason::InputRemoved { stage } => write!(f, "input removed: `{stage}`"),
            Reason::File {
                side: s,
                change,
                path,
            } => {
                let change = match change {
                    FileChange::Added => "added",
                    FileChange::Modified => "modified",
                    FileChange::Missing => "missing",
                };
                write!(f, "{} {change}: {path}", side(s))
            }
            Reason::OutputsChanged => write!(f, "outputs changed"),
            Reason::RecipeChanged => write!(f, "fingerprint recipe changed"),
            Reason::Unreadable {
                side: FileSide::Dep,
                error,
            } => {
                write!(f, "cannot read deps: {error}")
            }
            Reason::Unreadable {
                side: FileSide::Output,
                error,
            } => write!(f, "cannot read outputs: {error}"),
        }
    }
}

/// A reason as `status --json` shows it: the tagged fields plus the rendered text.
#[derive(Serialize)]
pub struct ShownReason<'a> {
    #[serde(flatten)]
    pub reason: &'a Reason,
    pub text: String,
}

impl<'a> From<&'a Reason> for ShownReason<'a> {
    fn from(reason: &'a Reason) -> Self {
        ShownReason {
            reason,
            text: reason.to_string(),
        }
    }
}

/// "a; b; c", as the console prints a stage's reasons on one line.
pub fn joined(reasons: &[Reason]) -> String {
    reasons
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_as_text_and_tagged_json() {
        let r = Reason::ParamChanged {
            param: "params.epochs".into(),
            from: Some("3".into()),
            to: None,
        };
        assert_eq!(r.to_string(), "params.epochs: 3 -> (unset)");
        let json = serde_json::to_value(ShownReason::from(&r)).unwrap();
        assert_eq!(json["reason"], "param_changed");
        assert_eq!(json["param"], "params.epochs");
        assert_eq!(json["from"], "3");
        assert_eq!(json["to"], serde_json::Value::Null);
        assert_eq!(json["text"], "params.epochs: 3 -> (unset)");
        let file = Reason::File {
            side: FileSide::Dep,
            change: FileChange::Modified,
            path: "a.txt".into(),
        };
        assert_eq!(file.to_string(), "dep modified: a.txt");
        let json = serde_json::to_value(ShownReason::from(&file)).unwrap();
        assert_eq!(json["reason"], "file");
        assert_eq!(json["side"], "dep");
        assert_eq!(json["change"], "modified");
    }
}

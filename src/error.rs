//! The engine's error classes, and the exit code each one maps to.

use std::path::Path;

/// Everything that can stop a command, sorted by what the user must do about it.
#[derive(Debug, thiserror::Error)]
pub enum PipeError {
    /// The pipeline file, an override or a command-line value is wrong (exit 2).
    #[error("{0}")]
    Config(String),
    /// Another `run` holds the workspace (exit 2).
    #[error(
        "a run is already in progress in this workspace ({0} is locked); wait for it to finish"
    )]
    Busy(String),
    /// A stage failed; its previous outputs and lock entry were kept (exit 1).
    #[error("{0}")]
    StageFailed(String),
    /// The user pressed Ctrl-C (exit 130).
    #[error("interrupted; finished stages were recorded, the interrupted ones left as they were")]
    Interrupted,
    /// The file system refused something the engine needs (exit 1).
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl PipeError {
    pub fn exit_code(&self) -> u8 {
        match self {
            PipeError::Config(_) | PipeError::Busy(_) => 2,
            PipeError::StageFailed(_) | PipeError::Io { .. } => 1,
            PipeError::Interrupted => 130,
        }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        PipeError::Io {
            context: context.into(),
            source,
        }
    }

    pub fn io_at(path: &Path, verb: &str, source: std::io::Error) -> Self {
        PipeError::io(format!("cannot {verb} {}", path.display()), source)
    }
}

/// A closest-match hint for a misspelled name, or an empty string.
pub fn suggestion<'a>(wrong: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    let best = candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(wrong, c), c))
        .filter(|(score, _)| *score > 0.75)
        .max_by(|a, b| a.0.total_cmp(&b.0));
    match best {
        Some((_, name)) => format!(" (did you mean `{name}`?)"),
        None => String::new(),
    }
}

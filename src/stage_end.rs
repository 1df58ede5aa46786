//! How a stage's work can end without outputs, shared by the runners and what they drive
//! (command_stage), so neither has to import the other.

use std::path::Path;

/// Why a stage did not produce outputs.
pub enum StageEnd {
    Failed(String),
    /// Where it was to run refused it as asked (sbatch rejecting its resources): a
    /// configuration error, exit 2.
    Refused(String),
    Interrupted,
}

/// `map_err` for an I/O step of a stage: "cannot VERB PATH: error".
pub fn io_fail(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> StageEnd {
    let what = what.to_string();
    let path = path.to_path_buf();
    move |e| StageEnd::Failed(format!("cannot {what} {}: {e}", path.display()))
}

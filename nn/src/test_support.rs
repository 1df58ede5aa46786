//! For tests that need something from outside the repository (the real data set, a browser):
//! they run where it is present; where it is missing they fail in CI (env `CI` set: a test
//! that cannot run must not pass) and are skipped elsewhere, with the reason printed.

use std::path::{Path, PathBuf};

use crate::data::DEBIAN_DATA_DIR;

/// `path` when it exists. When it does not: a panic naming `what` if env `CI` is set, else
/// None after printing (to stderr) that `test` is skipped and why.
pub fn require(path: &Path, what: &str, test: &str) -> Option<PathBuf> {
    if path.exists() {
        return Some(path.to_path_buf());
    }
    let why = format!("{what} is missing ({} does not exist)", path.display());
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {why}; CI is set, so a test that cannot run fails");
    }
    eprintln!("skipped {test}: {why}");
    None
}

/// The real Fashion-MNIST files (Debian's `dataset-fashion-mnist`), as [`require`] says.
pub fn real_data(test: &str) -> Option<PathBuf> {
    require(
        Path::new(DEBIAN_DATA_DIR),
        "the real data set (install the package dataset-fashion-mnist)",
        test,
    )
}

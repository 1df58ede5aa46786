//! What the CLI test suites share: a command's whole output as text, and where the committed
//! fixture subset of Fashion-MNIST is. Each suite uses what it needs of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Output;

/// stdout then stderr of a finished command, for assertions and their messages.
pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The fixture subset (a few hundred images of each split, as IDX files).
pub fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fashion-mnist")
}

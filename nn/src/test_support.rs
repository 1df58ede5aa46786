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

/// What headless Chromium made of a page: the DOM after the load event, and every line the
/// page wrote to the console (Chromium logs them all, errors and uncaught exceptions
/// included, as `INFO:CONSOLE` lines on stderr).
pub struct BrowserView {
    /// The DOM after the load event.
    pub dom: String,
    /// The page's console lines (errors and uncaught exceptions included).
    pub console: Vec<String>,
    /// Chromium's last stderr lines, for failure messages.
    pub stderr_tail: String,
}

impl BrowserView {
    /// The value of `<body name="...">` in the dumped DOM.
    pub fn body_attribute(&self, name: &str) -> Option<&str> {
        let at = self.dom.find(&format!("{name}=\""))? + name.len() + 2;
        let len = self.dom[at..].find('"')?;
        Some(&self.dom[at..at + len])
    }
}

/// Debian's Chromium (packages chromium and chromium-driver).
pub const CHROMIUM: &str = "/usr/bin/chromium";

/// Fresh profile folders, one per page opened.
static PROFILES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Opens `page` in headless Chromium with a fresh profile and no network features.
pub fn open_in_chromium(page: &Path) -> std::io::Result<BrowserView> {
    let profile = std::env::temp_dir().join(format!(
        "fmnist-chromium-{}-{}",
        std::process::id(),
        PROFILES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let output = std::process::Command::new("timeout")
        .arg("60")
        .arg(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("--dump-dom")
        .arg(format!("file://{}", page.display()))
        .output()?;
    let _ = std::fs::remove_dir_all(&profile);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        return Err(std::io::Error::other(format!(
            "chromium exited with {:?}: {stderr}",
            output.status
        )));
    }
    let mut tail: Vec<&str> = stderr.lines().rev().take(10).collect();
    tail.reverse();
    Ok(BrowserView {
        dom: String::from_utf8_lossy(&output.stdout).into_owned(),
        console: stderr
            .lines()
            .filter(|l| l.contains(":CONSOLE"))
            .map(str::to_string)
            .collect(),
        stderr_tail: tail.join("\n"),
    })
}

/// [`CHROMIUM`] when it is installed, as [`require`] says (`test` names the check).
pub fn chromium(test: &str) -> Option<PathBuf> {
    require(
        Path::new(CHROMIUM),
        "Chromium (Debian package chromium)",
        test,
    )
}

/// `len` values in [-1, 1) from a fixed linear congruential sequence per `seed`: inputs for
/// kernel tests that compare two paths (no RNG crate, the same values on every platform).
pub fn pseudo_random(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

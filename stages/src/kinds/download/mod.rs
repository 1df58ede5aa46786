//! The `download` stage: fetches the four original Fashion-MNIST files from an ordered list
//! of sources (local folders or http(s) base URLs), decompresses them, verifies each
//! against a pinned SHA-256 of its decompressed content, and publishes them as plain IDX
//! files (`train-images-idx3-ubyte`, ...) that `Dataset::load` reads without inflating.
//!
//! Each file is taken from the first source that yields verified content; a source that
//! fails (absent folder, refused connection, 404, wrong checksum) is reported and the next
//! one is tried. Nothing partial or unverified is ever published: content is written to a
//! hidden temporary name and renamed only after its hash matched. HTTP downloads keep their
//! partial bytes in the scratch folder, so an interrupted download resumes (HTTP Range).
//!
//! ```toml
//! [stages.download]
//! kind = "download"
//! sources = ["/usr/share/datasets/fashion-mnist", "https://example.org/fashion/"]
//! expect = "full"      # "full" (the real 70,000 images) | "fixture-subset" (tests)
//! retries = 3          # extra attempts per URL after a transient network failure
//! timeout_secs = 30    # connect and read timeout per request
//! ```
//! `sources`, `retries` and `timeout_secs` do not change the outputs (those are pinned by
//! hash), so they are left out of the fingerprint ([`UNHASHED_PARAMS`]).

mod fetch;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use fetch::Fetcher;

use anyhow::Context as _;

use crate::context::{Cancelled, Metrics, StageContext, StageError};
use crate::data::{Dataset, Split};
use crate::kind::{stage_kind, Outputs};

pub const NAME: &str = "download";
pub const VERSION: u32 = 1;

/// The `download` kind.
pub struct Download;

stage_kind!(Download, UNHASHED_PARAMS = UNHASHED_PARAMS);

/// A download stage's outputs, as other stages read them: the data set's two splits.
pub type DataFiles = Outputs<Download>;

impl DataFiles {
    /// One split, loaded.
    pub fn load(&self, split: Split) -> anyhow::Result<Dataset> {
        Dataset::load(&self.dir, split).with_context(|| {
            format!(
                "loading the {} set from {}",
                split_name(split),
                self.dir.display()
            )
        })
    }

    /// One split, loaded and cut to its first `limit` images (0 = all); an error when empty.
    pub fn load_nonempty(&self, split: Split, limit: usize) -> anyhow::Result<Dataset> {
        let set = self.load(split)?.truncated(limit);
        if set.is_empty() {
            anyhow::bail!(
                "the {} set in {} is empty",
                split_name(split),
                self.dir.display()
            );
        }
        Ok(set)
    }
}

fn split_name(split: Split) -> &'static str {
    match split {
        Split::Train => "training",
        Split::Test => "test",
    }
}

/// Params that do not influence the outputs; the registry leaves them out of the
/// fingerprint, so adding a mirror or changing a timeout does not rerun anything.
pub const UNHASHED_PARAMS: &[&str] = &["sources", "retries", "timeout_secs"];

/// Which pinned content the files must have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Expect {
    /// The original Fashion-MNIST: 60,000 training and 10,000 test images.
    #[default]
    Full,
    /// The repository's test fixture (tests/fixtures/fashion-mnist): the first 1,000
    /// training and 500 test images, so tests can run the real pipeline in seconds.
    FixtureSubset,
}

impl Expect {
    /// The four files this expectation pins.
    pub fn files(self) -> &'static [PinnedFile; 4] {
        match self {
            Expect::Full => &FULL,
            Expect::FixtureSubset => &FIXTURE_SUBSET,
        }
    }
}

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// Where to look, in order: local folders (plain or .gz files) or http(s) base URLs.
    #[serde(default = "default_sources")]
    pub sources: Vec<String>,
    #[serde(default)]
    pub expect: Expect,
    /// Extra attempts per URL after a transient failure (connection, timeout, 5xx), with
    /// exponential backoff starting at half a second.
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Connect and read timeout of each HTTP request, in seconds.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
}

fn default_sources() -> Vec<String> {
    vec![
        DEBIAN_FOLDER.to_string(),
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/".to_string(),
        "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/".to_string(),
    ]
}
fn default_retries() -> u32 {
    3
}
fn default_timeout_secs() -> u64 {
    30
}

impl Default for Params {
    fn default() -> Self {
        Params {
            sources: default_sources(),
            expect: Expect::Full,
            retries: default_retries(),
            timeout_secs: default_timeout_secs(),
        }
    }
}

impl Params {
    /// Rejects params that cannot work, before anything runs.
    pub fn validate(&self) -> Result<(), StageError> {
        if self.sources.is_empty() {
            return Err(StageError::InvalidParams(
                "`sources` is empty: list at least one folder or http(s) base URL".into(),
            ));
        }
        if let Some(s) = self.sources.iter().find(|s| s.trim().is_empty()) {
            return Err(StageError::InvalidParams(format!(
                "`sources` holds an empty entry ({s:?})"
            )));
        }
        if self.timeout_secs == 0 {
            return Err(StageError::InvalidParams(
                "`timeout_secs` must be at least 1".into(),
            ));
        }
        if self.retries > 20 {
            return Err(StageError::InvalidParams(format!(
                "`retries` = {} is too many (at most 20)",
                self.retries
            )));
        }
        Ok(())
    }
}

/// Where the Debian package `dataset-fashion-mnist` installs the data.
pub const DEBIAN_FOLDER: &str = crate::data::DEBIAN_DATA_DIR;

/// One file's expected decompressed content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinnedFile {
    /// The published (decompressed) name, e.g. "train-images-idx3-ubyte".
    pub name: &'static str,
    /// SHA-256 of the decompressed content, lowercase hex.
    pub sha256: &'static str,
    /// Decompressed size in bytes.
    pub size: u64,
}

/// The original files (computed from the Debian package, identical to upstream's).
pub const FULL: [PinnedFile; 4] = [
    PinnedFile {
        name: "train-images-idx3-ubyte",
        sha256: "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        size: 47_040_016,
    },
    PinnedFile {
        name: "train-labels-idx1-ubyte",
        sha256: "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        size: 60_008,
    },
    PinnedFile {
        name: "t10k-images-idx3-ubyte",
        sha256: "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        size: 7_840_016,
    },
    PinnedFile {
        name: "t10k-labels-idx1-ubyte",
        sha256: "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        size: 10_008,
    },
];

/// The test fixture's subset (tests/fixtures/fashion-mnist).
pub const FIXTURE_SUBSET: [PinnedFile; 4] = [
    PinnedFile {
        name: "train-images-idx3-ubyte",
        sha256: "e40edda7e9d8af05f5b762673ec21bbef87429a0c217d9e7953c711409749e45",
        size: 784_016,
    },
    PinnedFile {
        name: "train-labels-idx1-ubyte",
        sha256: "78ada934314bea75dcf5d086dfaad6ca75d2ed2801b6e35392fdb406a6338c12",
        size: 1_008,
    },
    PinnedFile {
        name: "t10k-images-idx3-ubyte",
        sha256: "c9bd0ed7148856eb2287d902861921296d6c36d95a5113341a35554343e84123",
        size: 392_016,
    },
    PinnedFile {
        name: "t10k-labels-idx1-ubyte",
        sha256: "9f5f7b9143df7bffff73a8bf7d8a53545dbf787f86e5e195c64401d2c6f8f372",
        size: 508,
    },
];

/// Why one source could not provide one file.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The whole source is unusable (absent folder, refused connection, unknown host):
    /// it is not tried again for the remaining files.
    #[error("{0}")]
    SourceUnavailable(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Network(String),
    /// The content is not the pinned one (tampered, truncated, another dataset).
    #[error("{0}")]
    WrongContent(String),
    #[error("{0}")]
    Io(String),
    #[error("interrupted")]
    Cancelled,
}

/// The stage's failure when no source could provide a file.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("{}", all_failed_message(.file, .failures))]
    AllSourcesFailed {
        file: String,
        /// (source, why it failed), in the order tried.
        failures: Vec<(String, String)>,
    },
    #[error("cannot write {}: {source}", path.display())]
    Output {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn all_failed_message(file: &str, failures: &[(String, String)]) -> String {
    let mut msg = format!("could not get a verified {file} from any source:\n");
    for (source, why) in failures {
        msg.push_str(&format!("  - {source}: {why}\n"));
    }
    msg.push_str(
        "To get the data: install the Debian/Ubuntu package `dataset-fashion-mnist` \
         (files in /usr/share/datasets/fashion-mnist), or add a folder holding the four \
         original files (or a reachable mirror URL) to `sources` of the download stage in \
         pipeline.toml.",
    );
    msg
}

pub fn run(params: Params, ctx: &StageContext) -> anyhow::Result<Metrics> {
    params.validate()?;
    let agent = ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(params.timeout_secs))
        .timeout_read(Duration::from_secs(params.timeout_secs))
        .user_agent(concat!("fmnist-pipe/", env!("CARGO_PKG_VERSION")))
        .build();
    let fetcher = Fetcher {
        ctx,
        agent,
        retries: params.retries,
    };
    // Sources found unusable as a whole, with the reason, so they are not retried per file.
    let mut unavailable: HashMap<&str, String> = HashMap::new();
    let mut files = serde_json::Map::new();
    for pinned in params.expect.files() {
        ctx.check_cancel()?;
        let mut failures = Vec::new();
        let mut origin = None;
        for source in &params.sources {
            if let Some(why) = unavailable.get(source.as_str()) {
                failures.push((source.clone(), why.clone()));
                continue;
            }
            match fetcher.fetch(source, pinned) {
                Ok(()) => {
                    origin = Some(source.clone());
                    break;
                }
                Err(FetchError::Cancelled) => return Err(Cancelled.into()),
                Err(e) => {
                    ctx.progress.println(&format!(
                        "{}: {source}: {e}; trying the next source",
                        pinned.name
                    ));
                    if let FetchError::SourceUnavailable(why) = &e {
                        unavailable.insert(source.as_str(), why.clone());
                    }
                    failures.push((source.clone(), e.to_string()));
                }
            }
        }
        let Some(origin) = origin else {
            return Err(DownloadError::AllSourcesFailed {
                file: pinned.name.to_string(),
                failures,
            }
            .into());
        };
        files.insert(
            pinned.name.to_string(),
            serde_json::json!({ "sha256": pinned.sha256, "bytes": pinned.size, "source": origin }),
        );
    }
    let (train, test) = match params.expect {
        Expect::Full => (60_000, 10_000),
        Expect::FixtureSubset => (1_000, 500),
    };
    ctx.progress.println(&format!(
        "{train} train + {test} test images verified against the pinned SHA-256 hashes"
    ));
    Ok(serde_json::json!({
        "expect": params.expect,
        "train_images": train,
        "test_images": test,
        "files": files,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_default_and_reject_unknown_values() {
        let p: Params = toml::from_str("").unwrap();
        assert_eq!(p.sources[0], DEBIAN_FOLDER);
        assert_eq!(p.expect, Expect::Full);
        let p: Params = toml::from_str(r#"expect = "fixture-subset""#).unwrap();
        assert_eq!(p.expect, Expect::FixtureSubset);
        let e = toml::from_str::<Params>(r#"expect = "partial""#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("full") && e.contains("fixture-subset"), "{e}");
        let e = toml::from_str::<Params>("mirror = 1")
            .unwrap_err()
            .to_string();
        assert!(e.contains("mirror"), "{e}");
        let empty = Params {
            sources: vec![],
            ..Params::default()
        };
        assert!(empty.validate().is_err());
    }

    #[test]
    fn failure_message_lists_every_source_and_the_remedy() {
        let msg = all_failed_message(
            "train-images-idx3-ubyte",
            &[
                ("/nope".into(), "folder /nope does not exist".into()),
                ("http://x/".into(), "HTTP 404 Not Found".into()),
            ],
        );
        assert!(msg.contains("/nope: folder") && msg.contains("http://x/: HTTP 404"));
        assert!(msg.contains("dataset-fashion-mnist") && msg.contains("sources"));
    }
}

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

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::context::{Cancelled, Metrics, StageContext, StageError};

pub const VERSION: u32 = 1;

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
pub const DEBIAN_FOLDER: &str = "/usr/share/datasets/fashion-mnist";

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

/// Gets one pinned file from one source into the stage's output folder.
struct Fetcher<'a> {
    ctx: &'a StageContext<'a>,
    agent: ureq::Agent,
    retries: u32,
}

impl Fetcher<'_> {
    fn fetch(&self, source: &str, pinned: &PinnedFile) -> Result<(), FetchError> {
        let source = source.trim();
        if source.starts_with("http://") || source.starts_with("https://") {
            self.fetch_from_url(source, pinned)
        } else {
            let folder = source.strip_prefix("file://").unwrap_or(source);
            self.fetch_from_folder(Path::new(folder), pinned)
        }
    }

    fn fetch_from_folder(&self, folder: &Path, pinned: &PinnedFile) -> Result<(), FetchError> {
        if !folder.is_dir() {
            return Err(FetchError::SourceUnavailable(format!(
                "folder {} does not exist",
                folder.display()
            )));
        }
        let candidates = [
            folder.join(pinned.name),
            folder.join(format!("{}.gz", pinned.name)),
        ];
        let Some(path) = candidates.iter().find(|p| p.is_file()) else {
            return Err(FetchError::NotFound(format!(
                "neither {0} nor {0}.gz is in {1}",
                pinned.name,
                folder.display()
            )));
        };
        let file = File::open(path)
            .map_err(|e| FetchError::Io(format!("cannot read {}: {e}", path.display())))?;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        self.install_verified(file, len, pinned, &path.display().to_string())
    }

    fn fetch_from_url(&self, base: &str, pinned: &PinnedFile) -> Result<(), FetchError> {
        let base = base.trim_end_matches('/');
        // Upstream publishes .gz files; a mirror of plain files is accepted too.
        let gz_url = format!("{base}/{}.gz", pinned.name);
        let plain_url = format!("{base}/{}", pinned.name);
        let (url, part) = match self.download(&gz_url) {
            Ok(part) => (gz_url, part),
            Err(FetchError::NotFound(gz_why)) => match self.download(&plain_url) {
                Ok(part) => (plain_url, part),
                Err(FetchError::NotFound(why)) => {
                    return Err(FetchError::NotFound(format!("{gz_why}; {why}")))
                }
                Err(e) => return Err(e),
            },
            Err(e) => return Err(e),
        };
        let file = File::open(&part)
            .map_err(|e| FetchError::Io(format!("cannot read {}: {e}", part.display())))?;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let result = self.install_verified(file, len, pinned, &url);
        // A complete or a corrupt download is of no further use; a later attempt (possibly
        // from another mirror) must start afresh rather than resume wrong bytes.
        if !matches!(result, Err(FetchError::Cancelled)) {
            let _ = fs::remove_file(&part);
        }
        result
    }

    /// Downloads `url` into the scratch folder, resuming a partial file from an earlier
    /// attempt, retrying transient failures with backoff. Returns the complete file.
    fn download(&self, url: &str) -> Result<PathBuf, FetchError> {
        let partial_dir = self.ctx.scratch_dir.join("partial");
        fs::create_dir_all(&partial_dir)
            .map_err(|e| FetchError::Io(format!("cannot create {}: {e}", partial_dir.display())))?;
        // Keyed by URL: bytes from one mirror are never resumed from another.
        let key = hex::encode(&Sha256::digest(url.as_bytes())[..12]);
        let part = partial_dir.join(format!("{key}.part"));
        let mut last_error = String::new();
        for attempt in 0..=self.retries {
            if attempt > 0 {
                let pause = Duration::from_millis(500u64 << (attempt - 1).min(6));
                self.ctx.progress.message(&format!(
                    "{url}: {last_error}; retry {attempt}/{} in {:.1} s",
                    self.retries,
                    pause.as_secs_f64()
                ));
                self.sleep(pause)?;
            }
            match self.download_once(url, &part) {
                Ok(()) => return Ok(part),
                Err(Attempt::Permanent(e)) => return Err(e),
                Err(Attempt::Transient {
                    why,
                    unreachable: true,
                }) if attempt == self.retries => {
                    return Err(FetchError::SourceUnavailable(format!("{url}: {why}")));
                }
                Err(Attempt::Transient { why, .. }) => last_error = why,
            }
        }
        Err(FetchError::Network(format!(
            "{url}: {last_error} (after {} attempts)",
            self.retries + 1
        )))
    }

    fn download_once(&self, url: &str, part: &Path) -> Result<(), Attempt> {
        self.ctx.check_cancel().map_err(|_| Attempt::cancelled())?;
        let have = fs::metadata(part).map(|m| m.len()).unwrap_or(0);
        let mut request = self.agent.get(url).set("Accept-Encoding", "identity");
        if have > 0 {
            request = request.set("Range", &format!("bytes={have}-"));
        }
        let response = match request.call() {
            Ok(r) => r,
            // The partial file already holds everything (verification will tell).
            Err(ureq::Error::Status(416, _)) if have > 0 => return Ok(()),
            Err(ureq::Error::Status(code, r)) => {
                let why = format!("HTTP {code} {}", r.status_text());
                return Err(match code {
                    404 | 410 => Attempt::Permanent(FetchError::NotFound(format!("{url}: {why}"))),
                    408 | 429 | 500..=599 => Attempt::Transient {
                        why,
                        unreachable: false,
                    },
                    _ => Attempt::Permanent(FetchError::Network(format!("{url}: {why}"))),
                });
            }
            Err(ureq::Error::Transport(t)) => {
                let unreachable = matches!(
                    t.kind(),
                    ureq::ErrorKind::ConnectionFailed | ureq::ErrorKind::Dns
                );
                let permanent = matches!(
                    t.kind(),
                    ureq::ErrorKind::InvalidUrl | ureq::ErrorKind::UnknownScheme
                );
                // Transport's Display repeats the URL, which the caller already names.
                let why = match t.message() {
                    Some(m) => format!("{}: {m}", t.kind()),
                    None => t.kind().to_string(),
                };
                return Err(if permanent {
                    Attempt::Permanent(FetchError::SourceUnavailable(why))
                } else {
                    Attempt::Transient { why, unreachable }
                });
            }
        };
        let resumed = response.status() == 206 && have > 0;
        let offset = if resumed { have } else { 0 };
        let total = response
            .header("Content-Length")
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map_or(0, |n| n + offset);
        let mut out = OpenOptions::new()
            .create(true)
            .write(true)
            .append(resumed)
            .truncate(!resumed)
            .open(part)
            .map_err(|e| {
                Attempt::Permanent(FetchError::Io(format!(
                    "cannot write {}: {e}",
                    part.display()
                )))
            })?;
        let name = url.rsplit('/').next().unwrap_or(url);
        let meter = Meter::start(self.ctx, &format!("download {name}"), total, offset);
        let mut body = response.into_reader();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            self.ctx.check_cancel().map_err(|_| Attempt::cancelled())?;
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                // The bytes so far stay in the partial file: the retry resumes after them.
                Err(e) => {
                    return Err(Attempt::Transient {
                        why: format!("connection lost after {} bytes: {e}", meter.done()),
                        unreachable: false,
                    })
                }
            };
            out.write_all(&buf[..n]).map_err(|e| {
                Attempt::Permanent(FetchError::Io(format!(
                    "cannot write {}: {e}",
                    part.display()
                )))
            })?;
            meter.advance(n as u64);
        }
        out.flush()
            .map_err(|e| Attempt::Permanent(FetchError::Io(e.to_string())))?;
        if total > 0 && meter.done() < total {
            return Err(Attempt::Transient {
                why: format!("connection closed after {} of {total} bytes", meter.done()),
                unreachable: false,
            });
        }
        meter.finish(resumed.then_some(offset));
        Ok(())
    }

    /// Decompresses (when gzip) and hashes `input` into a hidden file in the output
    /// folder; renames it to its published name only when size and SHA-256 match.
    fn install_verified(
        &self,
        input: File,
        input_len: u64,
        pinned: &PinnedFile,
        origin: &str,
    ) -> Result<(), FetchError> {
        let out_dir = self.ctx.out_dir;
        let final_path = out_dir.join(pinned.name);
        let temp_path = out_dir.join(format!(".{}.partial", pinned.name));
        let meter = Meter::start(self.ctx, &format!("verify {}", pinned.name), input_len, 0);
        let counted = CountingReader {
            inner: input,
            meter: &meter,
        };
        let mut buffered = BufReader::with_capacity(256 * 1024, counted);
        let head = buffered
            .fill_buf()
            .map_err(|e| FetchError::Io(format!("cannot read {origin}: {e}")))?;
        let gzip = head.starts_with(&[0x1f, 0x8b]);
        let mut content: Box<dyn Read> = if gzip {
            Box::new(flate2::bufread::MultiGzDecoder::new(buffered))
        } else {
            Box::new(buffered)
        };
        let written = (|| -> Result<(u64, String), FetchError> {
            let mut out = File::create(&temp_path).map_err(|e| {
                FetchError::Io(format!("cannot write {}: {e}", temp_path.display()))
            })?;
            let mut hasher = Sha256::new();
            let mut size = 0u64;
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                self.ctx.check_cancel().map_err(|_| FetchError::Cancelled)?;
                let n = match content.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        return Err(FetchError::WrongContent(format!(
                            "{origin}: {} after {size} bytes: {e}",
                            if gzip {
                                "corrupt gzip data"
                            } else {
                                "read error"
                            }
                        )))
                    }
                };
                size += n as u64;
                // Stop early on oversized content (a wrong file or a decompression bomb).
                if size > pinned.size {
                    return Err(FetchError::WrongContent(format!(
                        "{origin}: more than the expected {} bytes of {}",
                        pinned.size, pinned.name
                    )));
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n]).map_err(|e| {
                    FetchError::Io(format!("cannot write {}: {e}", temp_path.display()))
                })?;
            }
            out.sync_all().map_err(|e| {
                FetchError::Io(format!("cannot write {}: {e}", temp_path.display()))
            })?;
            Ok((size, hex::encode(hasher.finalize())))
        })();
        let verdict = written.and_then(|(size, sha)| {
            if size != pinned.size {
                Err(FetchError::WrongContent(format!(
                    "{origin}: {} is {size} bytes, expected {} (truncated or another file?)",
                    pinned.name, pinned.size
                )))
            } else if sha != pinned.sha256 {
                Err(FetchError::WrongContent(format!(
                    "{origin}: checksum mismatch for {}: SHA-256 {sha}, expected {}",
                    pinned.name, pinned.sha256
                )))
            } else {
                Ok(())
            }
        });
        if let Err(e) = verdict {
            let _ = fs::remove_file(&temp_path);
            return Err(e);
        }
        fs::rename(&temp_path, &final_path)
            .map_err(|e| FetchError::Io(format!("cannot publish {}: {e}", final_path.display())))?;
        meter.finish(None);
        Ok(())
    }

    /// Sleeps, waking early (as `Cancelled`) when the user interrupts.
    fn sleep(&self, total: Duration) -> Result<(), FetchError> {
        let until = Instant::now() + total;
        while Instant::now() < until {
            self.ctx.check_cancel().map_err(|_| FetchError::Cancelled)?;
            std::thread::sleep(Duration::from_millis(50).min(until - Instant::now()));
        }
        Ok(())
    }
}

/// The outcome of one failed HTTP attempt.
enum Attempt {
    Permanent(FetchError),
    /// Worth retrying; `unreachable` marks a failure to connect at all.
    Transient {
        why: String,
        unreachable: bool,
    },
}

impl Attempt {
    fn cancelled() -> Self {
        Attempt::Permanent(FetchError::Cancelled)
    }
}

/// Byte progress of one transfer, reported through the stage's progress sink with the
/// rate in the live message (throttled to a few updates a second).
struct Meter<'a> {
    ctx: &'a StageContext<'a>,
    phase: String,
    total: u64,
    started: Instant,
    done: std::cell::Cell<u64>,
    first: u64,
    last_message: std::cell::Cell<Instant>,
}

impl<'a> Meter<'a> {
    fn start(ctx: &'a StageContext<'a>, phase: &str, total: u64, already: u64) -> Self {
        ctx.progress.start(phase, total, "bytes");
        if already > 0 {
            ctx.progress.advance(already);
        }
        let now = Instant::now();
        Meter {
            ctx,
            phase: phase.to_string(),
            total,
            started: now,
            done: std::cell::Cell::new(already),
            first: already,
            last_message: std::cell::Cell::new(now),
        }
    }

    fn done(&self) -> u64 {
        self.done.get()
    }

    fn rate(&self) -> f64 {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        (self.done.get() - self.first) as f64 / secs
    }

    fn advance(&self, n: u64) {
        self.done.set(self.done.get() + n);
        self.ctx.progress.advance(n);
        if self.last_message.get().elapsed() >= Duration::from_millis(250) {
            self.last_message.set(Instant::now());
            let of_total = if self.total > 0 {
                format!(" of {}", megabytes(self.total))
            } else {
                String::new()
            };
            self.ctx.progress.message(&format!(
                "{}{of_total} at {}/s",
                megabytes(self.done.get()),
                megabytes(self.rate() as u64)
            ));
        }
    }

    fn finish(&self, resumed_from: Option<u64>) {
        let resumed = resumed_from.map_or(String::new(), |b| {
            format!(", resumed after {}", megabytes(b))
        });
        self.ctx.progress.finish(&format!(
            "{}: {} in {:.1} s ({}/s{resumed})",
            self.phase,
            megabytes(self.done.get()),
            self.started.elapsed().as_secs_f64(),
            megabytes(self.rate() as u64)
        ));
    }
}

fn megabytes(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// Reports the bytes read from the source (the compressed size, for gzip).
struct CountingReader<'m, R> {
    inner: R,
    meter: &'m Meter<'m>,
}

impl<R: Read> Read for CountingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.meter.advance(n as u64);
        Ok(n)
    }
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

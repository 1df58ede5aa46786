//! Getting one pinned file from one source (a local folder or an http(s) base URL) into the
//! stage's output folder: decompression, verification against the pinned SHA-256, resumable
//! HTTP with retries, and byte progress.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::{FetchError, PinnedFile};
use crate::context::StageContext;

/// Gets one pinned file from one source into the stage's output folder.
pub(super) struct Fetcher<'a> {
    pub(super) ctx: &'a StageContext<'a>,
    pub(super) agent: ureq::Agent,
    pub(super) retries: u32,
}

impl Fetcher<'_> {
    pub(super) fn fetch(&self, source: &str, pinned: &PinnedFile) -> Result<(), FetchError> {
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

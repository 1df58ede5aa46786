//! The remote run cache: the local run cache's layout on object storage (S3 or a shared
//! disk, through the `object_store` crate), shared by every workspace that names it.
//!
//! Layout under the remote's prefix:
//!
//! - `objects/<blake3[..2]>/<blake3[2..]>`: each output file once, by content. Uploads ask
//!   (HEAD) first and skip what is there; large files go up in parts.
//! - `runs/<fingerprint>.json`: the lock entry of the run that produced them, written LAST
//!   and only if absent (create-if-absent), so a push cut off halfway is never a hit and two
//!   workspaces pushing the same run both succeed (the loser finds the winner's identical
//!   record).
//!
//! Every download is checked against its blake3 before anything publishes it: a corrupt or
//! missing object is a miss (the stage runs), never a wrong output; the run's push then
//! replaces the corrupt copy (uploads otherwise trust an object that is there). The engine is
//! synchronous: a `Remote` owns a small tokio runtime and blocks on it. Credentials come from
//! the AWS environment (or ~/.aws/credentials) and are scrubbed from every message.

mod commands;
mod s3;
mod tiered;

pub use commands::{pull, push, remote_status};
pub use tiered::TieredCache;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use object_store::path::Path as Key;
use object_store::{
    ObjectStore, ObjectStoreExt, ObjectStoreScheme, PutMode, PutOptions, PutPayload, WriteMultipart,
};

use crate::config::CacheSettings;
use crate::lock::LockEntry;

/// Transfers at once.
pub const PARALLEL: usize = 8;
/// Files from this size on go up in parts (S3 refuses parts under 5 MiB but the last).
const MULTIPART_FROM: u64 = 16 << 20;
const PART_SIZE: usize = 8 << 20;
/// Parts in flight per multipart upload.
const PARTS_IN_FLIGHT: usize = 4;

/// A failure of the remote itself (unreachable, refused, timed out), as opposed to one
/// object being missing or corrupt: after one, a command goes on without the remote.
#[derive(Debug)]
pub struct Unavailable(pub String);

impl std::fmt::Display for Unavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unavailable {}

/// Whether `e` says the remote is down (rather than one object being missing or bad).
pub fn is_unavailable(e: &std::io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<Unavailable>())
}

/// One remote, opened.
pub struct Remote {
    store: Arc<dyn ObjectStore>,
    prefix: Key,
    /// The URL as the user wrote it (credentials refused by config), for messages.
    pub shown: String,
    rt: tokio::runtime::Runtime,
    /// Values never to print: the secret key and session token in use.
    secrets: Vec<String>,
}

impl Remote {
    /// Opens the remote `settings` names. Nothing is contacted yet.
    pub fn open(settings: &CacheSettings) -> Result<Remote, String> {
        let remote = settings
            .remote
            .as_deref()
            .ok_or("no [cache] remote is set")?;
        crate::config::check_remote(remote)?;
        let url = url::Url::parse(remote).map_err(|e| format!("[cache] remote: {e}"))?;
        let (scheme, prefix) =
            ObjectStoreScheme::parse(&url).map_err(|e| format!("[cache] remote: {e}"))?;
        let mut secrets = Vec::new();
        let (store, prefix): (Arc<dyn ObjectStore>, Key) = match scheme {
            ObjectStoreScheme::Local => {
                let dir = url
                    .to_file_path()
                    .map_err(|_| "[cache] remote: not an absolute file path".to_string())?;
                std::fs::create_dir_all(&dir)
                    .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
                let store = object_store::local::LocalFileSystem::new_with_prefix(&dir)
                    .map_err(|e| format!("cannot open {}: {e}", dir.display()))?;
                (Arc::new(store), Key::default())
            }
            ObjectStoreScheme::AmazonS3 => {
                let store = s3::s3(&url, settings, &mut secrets)?;
                (Arc::new(store), prefix)
            }
            _ => return Err("[cache] remote: only s3:// and file:// are supported".into()),
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("remote-cache")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the remote cache's runtime: {e}"))?;
        Ok(Remote {
            store,
            prefix,
            shown: remote.to_string(),
            rt,
            secrets,
        })
    }

    fn object_key(&self, hash: &str) -> Key {
        let (head, rest) = hash.split_at(2.min(hash.len()));
        self.prefix.clone().join("objects").join(head).join(rest)
    }

    fn run_key(&self, fingerprint: &str) -> Key {
        self.prefix
            .clone()
            .join("runs")
            .join(format!("{fingerprint}.json"))
    }

    /// Blocks on one of this remote's futures.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// `e` as an io::Error: NotFound stays NotFound (a miss); everything else says the
    /// remote is unavailable. Secrets scrubbed.
    fn fault(&self, what: &str, e: object_store::Error) -> std::io::Error {
        match e {
            object_store::Error::NotFound { .. } => std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{what}: not in the remote"),
            ),
            other => std::io::Error::other(Unavailable(self.scrub(&format!("{what}: {other}")))),
        }
    }

    /// `text` with every secret in use replaced by "***".
    pub fn scrub(&self, text: &str) -> String {
        let mut text = text.to_string();
        for secret in &self.secrets {
            text = text.replace(secret.as_str(), "***");
        }
        text
    }

    /// Whether the remote answers (a HEAD of a key that need not exist).
    pub async fn ping(&self) -> std::io::Result<()> {
        match self.store.head(&self.run_key("ping")).await {
            Ok(_) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.fault("reaching the remote", e)),
        }
    }

    /// The run record of `fingerprint`, if the remote has one.
    pub async fn get_run(&self, fingerprint: &str) -> std::io::Result<Option<LockEntry>> {
        let key = self.run_key(fingerprint);
        let bytes = match self.store.get(&key).await {
            Ok(got) => got
                .bytes()
                .await
                .map_err(|e| self.fault("reading a run record", e))?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.fault("reading a run record", e)),
        };
        let entry: LockEntry = serde_json::from_slice(&bytes).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("run record {key} is damaged: {e}"),
            )
        })?;
        Ok((entry.fingerprint == fingerprint).then_some(entry))
    }

    /// Writes the run record of `entry` unless one is there: the first push wins, and a
    /// later one (the same fingerprint, so the same outputs) agrees with it.
    pub async fn put_run(&self, entry: &LockEntry) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(entry).map_err(std::io::Error::other)?;
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&self.run_key(&entry.fingerprint), json.into(), opts)
            .await
        {
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
            Err(e) => Err(self.fault("writing a run record", e)),
        }
    }

    /// Whether the remote holds the object `hash`.
    pub async fn has_object(&self, hash: &str) -> std::io::Result<bool> {
        match self.store.head(&self.object_key(hash)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.fault("asking for an object", e)),
        }
    }

    /// Downloads object `hash` to `dest` (parents created), checking its blake3 as it
    /// streams: a mismatch deletes `dest` and is `InvalidData`. Returns the bytes written.
    pub async fn download(&self, hash: &str, dest: &Path) -> std::io::Result<u64> {
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let what = format!("downloading {}", short(hash));
        let got = self
            .store
            .get(&self.object_key(hash))
            .await
            .map_err(|e| self.fault(&what, e))?;
        let mut stream = got.into_stream();
        let mut file = std::io::BufWriter::new(std::fs::File::create(dest)?);
        let mut hasher = blake3::Hasher::new();
        let mut written = 0u64;
        let streamed: std::io::Result<()> = async {
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| self.fault(&what, e))?;
                hasher.update(&chunk);
                file.write_all(&chunk)?;
                written += chunk.len() as u64;
            }
            file.flush()
        }
        .await;
        drop(file);
        let actual = hasher.finalize().to_hex();
        let checked = streamed.and_then(|()| {
            if actual.as_str() == hash {
                Ok(written)
            } else {
                Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "the remote's copy of {} is corrupt (its blake3 is {})",
                        short(hash),
                        short(actual.as_str())
                    ),
                ))
            }
        });
        if checked.is_err() {
            let _ = std::fs::remove_file(dest);
        }
        checked
    }

    /// Uploads `source` as object `hash` unless the remote has it (`replace`: even so, over
    /// a copy found corrupt). The bytes sent are hashed on the way: a file that no longer
    /// matches `hash` is not uploaded (`InvalidData`). Returns the bytes sent (0: already
    /// there).
    pub async fn upload(&self, hash: &str, source: &Path, replace: bool) -> std::io::Result<u64> {
        if !replace && self.has_object(hash).await? {
            return Ok(0);
        }
        let key = self.object_key(hash);
        let what = format!("uploading {}", short(hash));
        let changed = || {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{} no longer has the content recorded ({}); not uploaded",
                    source.display(),
                    short(hash)
                ),
            )
        };
        let size = std::fs::metadata(source)?.len();
        if size < MULTIPART_FROM {
            let bytes = std::fs::read(source)?;
            if blake3::hash(&bytes).to_hex().as_str() != hash {
                return Err(changed());
            }
            self.store
                .put(&key, PutPayload::from(bytes))
                .await
                .map_err(|e| self.fault(&what, e))?;
            return Ok(size);
        }
        // In parts: nothing is visible under `key` until the upload completes; abandoned
        // parts are the store's to expire.
        let upload = self
            .store
            .put_multipart(&key)
            .await
            .map_err(|e| self.fault(&what, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let mut file = std::fs::File::open(source)?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut sent = 0u64;
        let read: std::io::Result<()> = async {
            loop {
                writer
                    .wait_for_capacity(PARTS_IN_FLIGHT)
                    .await
                    .map_err(|e| self.fault(&what, e))?;
                let n = file.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                hasher.update(&buf[..n]);
                writer.write(&buf[..n]);
                sent += n as u64;
            }
        }
        .await;
        let result = read.and_then(|()| {
            if hasher.finalize().to_hex().as_str() == hash {
                Ok(())
            } else {
                Err(changed())
            }
        });
        match result {
            Ok(()) => {
                writer.finish().await.map_err(|e| self.fault(&what, e))?;
                Ok(sent)
            }
            Err(e) => {
                let _ = writer.abort().await;
                Err(e)
            }
        }
    }

    /// Uploads many files (hash, source) at once, at most [`PARALLEL`] in flight, those in
    /// `replace` even over what the remote has; `done` is called after each with its result.
    /// Stops starting new ones once the remote is unavailable.
    pub async fn upload_all(
        &self,
        files: Vec<(String, PathBuf)>,
        replace: &std::collections::HashSet<String>,
        done: impl Fn(&str, &std::io::Result<u64>),
    ) -> Vec<(String, std::io::Result<u64>)> {
        let down = std::sync::atomic::AtomicBool::new(false);
        let down = &down;
        futures::stream::iter(files)
            .map(|(hash, source)| async move {
                let result = if down.load(std::sync::atomic::Ordering::Relaxed) {
                    Err(std::io::Error::other(Unavailable(
                        "skipped: the remote is unavailable".into(),
                    )))
                } else {
                    self.upload(&hash, &source, replace.contains(&hash)).await
                };
                if result.as_ref().is_err_and(is_unavailable) {
                    down.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                (hash, result)
            })
            .buffer_unordered(PARALLEL)
            .inspect(|(hash, result)| done(hash, result))
            .collect()
            .await
    }

    /// Downloads many objects (hash, destination) at once, like [`Remote::upload_all`].
    pub async fn download_all(
        &self,
        files: Vec<(String, PathBuf)>,
        done: impl Fn(&str, &std::io::Result<u64>),
    ) -> Vec<(String, std::io::Result<u64>)> {
        let down = std::sync::atomic::AtomicBool::new(false);
        let down = &down;
        futures::stream::iter(files)
            .map(|(hash, dest)| async move {
                let result = if down.load(std::sync::atomic::Ordering::Relaxed) {
                    Err(std::io::Error::other(Unavailable(
                        "skipped: the remote is unavailable".into(),
                    )))
                } else {
                    self.download(&hash, &dest).await
                };
                if result.as_ref().is_err_and(is_unavailable) {
                    down.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                (hash, result)
            })
            .buffer_unordered(PARALLEL)
            .inspect(|(hash, result)| done(hash, result))
            .collect()
            .await
    }

    /// Which of `hashes` the remote holds (HEADs, [`PARALLEL`] at once).
    pub async fn which_exist(&self, hashes: Vec<String>) -> std::io::Result<Vec<(String, bool)>> {
        futures::stream::iter(hashes)
            .map(|hash| async move {
                let there = self.has_object(&hash).await?;
                Ok((hash, there))
            })
            .buffer_unordered(PARALLEL)
            .collect::<Vec<std::io::Result<_>>>()
            .await
            .into_iter()
            .collect()
    }
}

/// The first 12 characters of a hash, for messages.
pub fn short(hash: &str) -> &str {
    &hash[..12.min(hash.len())]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_remote(dir: &Path) -> Remote {
        let settings = CacheSettings {
            remote: Some(format!("file://{}", dir.display())),
            ..Default::default()
        };
        Remote::open(&settings).unwrap()
    }

    fn entry(fingerprint: &str, outs: Vec<crate::manifest::FileRecord>) -> LockEntry {
        LockEntry {
            kind: "cmd".into(),
            version: 0,
            fingerprint: fingerprint.into(),
            outs_hash: "h".into(),
            device: None,
            kernels: None,
            placed: None,
            seed: None,
            seconds: 0.5,
            finished: None,
            params: Default::default(),
            upstream: Default::default(),
            metrics: Default::default(),
            deps: vec![],
            outs,
        }
    }

    #[test]
    fn objects_round_trip_verified_and_runs_are_create_if_absent() {
        let tmp = tempfile::tempdir().unwrap();
        let remote = file_remote(&tmp.path().join("remote"));
        let src = tmp.path().join("a.bin");
        std::fs::write(&src, b"hello").unwrap();
        let hash = blake3::hash(b"hello").to_hex().to_string();
        assert_eq!(
            remote.block_on(remote.upload(&hash, &src, false)).unwrap(),
            5
        );
        assert_eq!(
            remote.block_on(remote.upload(&hash, &src, false)).unwrap(),
            0,
            "skipped"
        );
        let dest = tmp.path().join("out/a.bin");
        remote.block_on(remote.download(&hash, &dest)).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"hello");

        // A file that changed since it was recorded is not uploaded under the old hash.
        std::fs::write(&src, b"changed").unwrap();
        let other = blake3::hash(b"other").to_hex().to_string();
        let err = remote
            .block_on(remote.upload(&other, &src, false))
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
        assert!(!remote.block_on(remote.has_object(&other)).unwrap());

        // Tampered bytes in the remote: the download is refused and leaves nothing.
        let object = tmp
            .path()
            .join("remote/objects")
            .join(&hash[..2])
            .join(&hash[2..]);
        std::fs::write(&object, b"HELLO").unwrap();
        let err = remote.block_on(remote.download(&hash, &dest)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
        assert!(!is_unavailable(&err));
        assert!(!dest.exists());

        // Missing: NotFound, not "unavailable".
        let err = remote.block_on(remote.download(&other, &dest)).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");

        // Run records: absent until written; a second writer agrees.
        assert!(remote.block_on(remote.get_run("f1")).unwrap().is_none());
        let first = entry("f1", vec![]);
        remote.block_on(remote.put_run(&first)).unwrap();
        let mut second = entry("f1", vec![]);
        second.seconds = 9.0;
        remote.block_on(remote.put_run(&second)).unwrap();
        assert_eq!(remote.block_on(remote.get_run("f1")).unwrap(), Some(first));
    }

    #[test]
    fn a_dead_server_is_unavailable_quickly() {
        let settings = CacheSettings {
            remote: Some("s3://bucket/prefix".into()),
            endpoint: Some("http://127.0.0.1:9".into()),
            ..Default::default()
        };
        let remote = Remote::open(&settings).unwrap();
        let started = std::time::Instant::now();
        let err = remote.block_on(remote.ping()).unwrap_err();
        assert!(is_unavailable(&err), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
    }
}

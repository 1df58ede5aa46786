//! The remote run cache through the real binary, against a real S3-compatible server on
//! 127.0.0.1 (moto's server mode, started once per test binary by `scripts/s3-local.sh up` on
//! its own port; each test under its own prefix of the bucket): workspace A runs and pushes,
//! a fresh workspace B runs nothing but downloads and ends with the same bytes; `pull` puts a
//! lock's outputs in place; a tampered object is detected, its stage recomputed and the
//! remote repaired; a missing one is a miss too; credentials come from a profile; a dead,
//! hung or mid-run-stopped server does not fail a local run (one warning) unless
//! `cache.required = true`; a push cut off halfway leaves no run record; two workspaces
//! pushing the same run at once both succeed; a file:// remote works; and the secret key
//! never appears in any output or workspace file. Without the server the S3 tests are
//! skipped with a printed reason, or fail when CI is set.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

mod common;
use common::{fixture_dir, text};

const BUCKET: &str = "fmnist-cache";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The S3 server the tests share: its endpoint and the AWS environment for the binary.
struct S3 {
    endpoint: String,
    env: Vec<(String, String)>,
}

impl S3 {
    fn secret(&self) -> &str {
        self.var("AWS_SECRET_ACCESS_KEY")
    }

    fn var(&self, key: &str) -> &str {
        self.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_default()
    }

    /// An object_store client of the bucket, for what the tests do behind the binary's back.
    fn client(&self) -> AmazonS3 {
        AmazonS3Builder::new()
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_bucket_name(BUCKET)
            .with_region("us-east-1")
            .with_access_key_id(self.var("AWS_ACCESS_KEY_ID"))
            .with_secret_access_key(self.secret())
            .build()
            .expect("an S3 client")
    }
}

fn block<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(f)
}

static SERVER: OnceLock<Result<S3, String>> = OnceLock::new();

/// Starts the server once (or finds it running); when this process exits, a watchdog stops
/// a server it started.
fn start_server() -> Result<S3, String> {
    let script = repo().join("scripts/s3-local.sh");
    let was_running = Command::new(&script)
        .arg("status")
        .output()
        .is_ok_and(|o| o.status.success());
    // Our own port: 19000-19999 by pid, or any free one if that is taken.
    let port = [19000 + std::process::id() % 1000, 0]
        .into_iter()
        .find_map(|p| TcpListener::bind(("127.0.0.1", p as u16)).ok())
        .and_then(|l| l.local_addr().ok())
        .map_or(0, |a| a.port());
    let up = Command::new(&script)
        .arg("up")
        .env("S3_LOCAL_PORT", port.to_string())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !up.status.success() {
        return Err(format!(
            "`scripts/s3-local.sh up` failed: {}",
            String::from_utf8_lossy(&up.stderr)
        ));
    }
    if !was_running {
        // Stops the server once this test process is gone.
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while kill -0 {} 2>/dev/null; do sleep 1; done; exec '{}' down",
                std::process::id(),
                script.display()
            ))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }
    let env = Command::new(&script)
        .arg("env")
        .output()
        .map_err(|e| format!("s3-local.sh env: {e}"))?;
    let env: Vec<(String, String)> = String::from_utf8_lossy(&env.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .filter(|(k, _)| k.starts_with("AWS_"))
        .collect();
    let endpoint = env
        .iter()
        .find(|(k, _)| k == "AWS_ENDPOINT_URL")
        .map(|(_, v)| v.clone())
        .ok_or("s3-local.sh env printed no AWS_ENDPOINT_URL")?;
    Ok(S3 { endpoint, env })
}

/// The server, or None with the reason printed (a panic in CI).
fn server(test: &str) -> Option<&'static S3> {
    match SERVER.get_or_init(start_server) {
        Ok(s3) => Some(s3),
        Err(why) => {
            let why = format!("{test}: no S3 server ({why}); `scripts/s3-local.sh up` starts one");
            if std::env::var_os("CI").is_some() {
                panic!("{why}");
            }
            eprintln!("SKIPPED {why}");
            None
        }
    }
}

/// A prefix of the bucket no other test (or earlier run) uses.
fn unique_prefix(test: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{test}-{}-{nanos}", std::process::id())
}

struct Workspace {
    dir: tempfile::TempDir,
    /// The AWS environment the binary gets (and nothing else of the kind).
    env: Vec<(String, String)>,
    /// Never to be seen in any output.
    secret: String,
}

impl Workspace {
    fn new(pipeline: &str, s3: Option<&S3>) -> Workspace {
        let dir = tempfile::tempdir().expect("temp workspace");
        std::fs::write(dir.path().join("pipeline.toml"), pipeline).expect("write pipeline");
        Workspace {
            dir,
            env: s3.map(|s| s.env.clone()).unwrap_or_default(),
            secret: s3.map(|s| s.secret().to_string()).unwrap_or_default(),
        }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fmnist-pipe"));
        cmd.args(args)
            .current_dir(self.dir.path())
            .env_remove("RUST_LOG")
            // Only what the test gives: no profile or credentials of the machine.
            .env("HOME", self.dir.path())
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_SHARED_CREDENTIALS_FILE")
            .env_remove("AWS_CONFIG_FILE")
            .env_remove("AWS_ENDPOINT_URL")
            .env_remove("AWS_SESSION_TOKEN");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Runs the binary; whatever happens, the secret is not in what it printed.
    fn pipe(&self, args: &[&str]) -> Output {
        let out = self.command(args).output().expect("fmnist-pipe runs");
        self.no_secret(&out);
        out
    }

    fn no_secret(&self, out: &Output) {
        if !self.secret.is_empty() {
            assert!(
                !text(out).contains(&self.secret),
                "the secret key was printed:\n{}",
                text(out)
            );
        }
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.pipe(args);
        assert!(out.status.success(), "{args:?} failed:\n{}", text(&out));
        text(&out)
    }

    fn read(&self, rel: &str) -> Vec<u8> {
        std::fs::read(self.path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
    }

    /// Every file under the workspace, relative path -> bytes (the engine's own folders out).
    fn files(&self, under: &str) -> Vec<(String, Vec<u8>)> {
        let mut found = Vec::new();
        walk(self.dir.path(), &self.path(under), &mut found);
        found.retain(|(p, _)| !p.contains("/.") && !p.starts_with('.'));
        found.sort();
        found
    }

    /// No file of the workspace (outputs, lock, caches, logs) holds the secret.
    fn assert_no_secret_in_files(&self) {
        let mut found = Vec::new();
        walk(self.dir.path(), self.dir.path(), &mut found);
        for (path, bytes) in found {
            assert!(
                !bytes
                    .windows(self.secret.len().max(1))
                    .any(|w| w == self.secret.as_bytes()),
                "the secret key is in {path}"
            );
        }
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    let Ok(items) = std::fs::read_dir(dir) else {
        return;
    };
    for item in items.flatten() {
        let path = item.path();
        if path.is_dir() {
            walk(root, &path, out);
        } else if let Ok(bytes) = std::fs::read(&path) {
            let rel = path.strip_prefix(root).unwrap_or(&path);
            out.push((rel.to_string_lossy().into_owned(), bytes));
        }
    }
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

/// The study, small: download, one short training, evaluation.
fn study(remote: &str) -> String {
    format!(
        r#"
[pipeline]
device = "cpu"
seed = 7

[cache]
remote = "{remote}"

[stages.download]
kind = "download"
sources = ["{fixtures}"]
expect = "fixture-subset"

[stages.train-baseline]
kind = "train"
needs = ["download"]
model = "baseline"
epochs = 1
batch_size = 32
train_limit = 256
optimizer = {{ name = "adadelta", lr = 1.0 }}

[stages.evaluate]
kind = "evaluate"
needs = ["download", "train-baseline"]
test_limit = 200
"#,
        fixtures = fixture_dir().display()
    )
}

/// Three command stages in a chain (a -> b -> c), with `extra` as the [cache] table's body.
fn chain(cache: &str, middle_cmd: &str) -> String {
    format!(
        r#"
[cache]
{cache}

[stages.a]
cmd = "mkdir -p out && echo first > out/a.txt"
outs = ["out/a.txt"]

[stages.b]
cmd = "{middle_cmd}cp out/a.txt out/b.txt && echo second >> out/b.txt"
deps = ["out/a.txt"]
outs = ["out/b.txt"]

[stages.c]
cmd = "cp out/b.txt out/c.txt && echo third >> out/c.txt"
deps = ["out/b.txt"]
outs = ["out/c.txt"]
"#
    )
}

fn s3_remote(prefix: &str) -> String {
    format!("s3://{BUCKET}/{prefix}")
}

/// The run records under `prefix` in the bucket.
fn run_records(s3: &S3, prefix: &str) -> Vec<String> {
    let client = s3.client();
    let runs = Key::from(format!("{prefix}/runs"));
    block(async {
        client
            .list(Some(&runs))
            .map_ok(|m| m.location.to_string())
            .try_collect::<Vec<_>>()
            .await
    })
    .expect("list the bucket")
}

#[test]
fn a_fresh_workspace_restores_the_study_from_what_another_pushed() {
    let Some(s3) = server("study") else { return };
    let prefix = unique_prefix("study");
    let pipeline = study(&s3_remote(&prefix));

    let a = Workspace::new(&pipeline, Some(s3));
    let first = a.ok(&["run"]);
    assert_eq!(count(&first, ": running"), 3, "{first}");
    assert!(!first.contains("warning"), "{first}");
    assert_eq!(run_records(s3, &prefix).len(), 3, "one record per stage");
    let remote = a.ok(&["status", "--remote"]);
    assert_eq!(
        count(&remote, "local cache: yes  remote: yes"),
        3,
        "{remote}"
    );

    // B: the same pipeline.toml, nothing else: every stage comes from the remote.
    let b = Workspace::new(&pipeline, Some(s3));
    let started = Instant::now();
    let restored = b.ok(&["run"]);
    let took = started.elapsed();
    for stage in ["download", "train-baseline", "evaluate"] {
        assert!(
            restored.contains(&format!("{stage}: restored from remote")),
            "{stage}:\n{restored}"
        );
    }
    assert!(!restored.contains("running"), "{restored}");
    eprintln!("workspace B up to date from the remote in {took:?}");
    assert_eq!(a.files("artifacts"), b.files("artifacts"), "the same bytes");
    assert!(!a.files("artifacts").is_empty());
    let status = b.ok(&["status"]);
    assert_eq!(count(&status, "up to date"), 3, "{status}");
    let again = b.ok(&["run"]);
    assert_eq!(count(&again, "up to date"), 3, "{again}");

    // C: the pipeline and its lock (as committed), then `pull`: outputs in place, nothing runs.
    let c = Workspace::new(&pipeline, Some(s3));
    std::fs::copy(a.path("pipeline.lock"), c.path("pipeline.lock")).unwrap();
    let pulled = c.ok(&["pull"]);
    assert_eq!(count(&pulled, "restored from remote"), 3, "{pulled}");
    assert_eq!(a.files("artifacts"), c.files("artifacts"));
    let status = c.ok(&["status"]);
    assert_eq!(count(&status, "up to date"), 3, "{status}");
    // A changed output is put back by the next pull; an intact one is left alone.
    std::fs::write(c.path("artifacts/evaluate/metrics.json"), b"{}").unwrap();
    let pulled = c.ok(&["pull", "--stage", "evaluate"]);
    assert!(
        pulled.contains("evaluate: restored from remote"),
        "{pulled}"
    );
    assert_eq!(a.files("artifacts"), c.files("artifacts"));
    let pulled = c.ok(&["pull"]);
    assert_eq!(count(&pulled, ": up to date"), 3, "{pulled}");

    for ws in [&a, &b, &c] {
        ws.assert_no_secret_in_files();
    }
}

#[test]
fn a_tampered_object_is_detected_and_its_stage_recomputed() {
    let Some(s3) = server("tamper") else { return };
    let prefix = unique_prefix("tamper");
    let pipeline = chain(&format!("remote = \"{}\"", s3_remote(&prefix)), "");
    let a = Workspace::new(&pipeline, Some(s3));
    a.ok(&["run"]);

    // Overwrite b.txt's object in the bucket with other bytes.
    let b_txt = a.read("out/b.txt");
    let hash = blake3::hash(&b_txt).to_hex().to_string();
    let key = Key::from(format!("{prefix}/objects/{}/{}", &hash[..2], &hash[2..]));
    let client = s3.client();
    block(client.put(&key, PutPayload::from(b"tampered\n".to_vec()))).expect("tamper");

    // And delete c.txt's object.
    let c_hash = blake3::hash(&a.read("out/c.txt")).to_hex().to_string();
    let c_key = Key::from(format!(
        "{prefix}/objects/{}/{}",
        &c_hash[..2],
        &c_hash[2..]
    ));
    block(client.delete(&c_key)).expect("delete");

    let b = Workspace::new(&pipeline, Some(s3));
    let out = b.ok(&["run"]);
    eprintln!("{out}");
    assert!(out.contains("a: restored from remote"), "{out}");
    assert!(out.contains("corrupt"), "the tampering is reported:\n{out}");
    assert!(out.contains("b: running"), "{out}");
    assert!(
        out.contains("not in the remote"),
        "the missing object is reported:\n{out}"
    );
    assert!(out.contains("c: running"), "{out}");
    assert_eq!(b.read("out/b.txt"), b_txt, "never the tampered bytes");
    assert_eq!(b.read("out/c.txt"), a.read("out/c.txt"));
    assert!(b.ok(&["status"]).matches("up to date").count() == 3);
    // B's runs pushed the good copies: the remote is whole again.
    let remote = b.ok(&["status", "--remote"]);
    assert_eq!(count(&remote, "remote: yes"), 3, "{remote}");
    let d = Workspace::new(&pipeline, Some(s3));
    let out = d.ok(&["run"]);
    assert_eq!(count(&out, "restored from remote"), 3, "{out}");
    assert_eq!(d.read("out/b.txt"), b_txt);
}

#[test]
fn credentials_can_come_from_a_profile_in_the_shared_files() {
    let Some(s3) = server("profile") else { return };
    let prefix = unique_prefix("profile");
    let mut ws = Workspace::new(
        &chain(&format!("remote = \"{}\"", s3_remote(&prefix)), ""),
        Some(s3),
    );
    let files = tempfile::tempdir().unwrap();
    let credentials = files.path().join("credentials");
    let config = files.path().join("config");
    std::fs::write(
        &credentials,
        format!(
            "[default]\naws_access_key_id = wrong\n\n[team]\naws_access_key_id = {}\n\
             aws_secret_access_key = {}\n",
            s3.var("AWS_ACCESS_KEY_ID"),
            s3.secret()
        ),
    )
    .unwrap();
    std::fs::write(&config, "[profile team]\nregion = us-east-1\n").unwrap();
    ws.env.retain(|(k, _)| {
        !matches!(
            k.as_str(),
            "AWS_ACCESS_KEY_ID" | "AWS_SECRET_ACCESS_KEY" | "AWS_REGION"
        )
    });
    ws.env.extend([
        ("AWS_PROFILE".to_string(), "team".to_string()),
        (
            "AWS_SHARED_CREDENTIALS_FILE".to_string(),
            credentials.display().to_string(),
        ),
        ("AWS_CONFIG_FILE".to_string(), config.display().to_string()),
    ]);
    let out = ws.ok(&["run"]);
    assert!(!out.contains("warning"), "{out}");
    assert_eq!(run_records(s3, &prefix).len(), 3, "{out}");
    ws.assert_no_secret_in_files();
}

/// A port nothing listens on.
fn dead_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A server that accepts connections and never answers.
fn hung_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    port
}

#[test]
fn a_dead_or_hung_remote_does_not_fail_a_local_run_unless_required() {
    let Some(s3) = server("dead") else { return };
    for (what, port) in [("dead", dead_port()), ("hung", hung_port())] {
        let ws = Workspace::new(&chain("", ""), Some(s3));
        let remote = format!("--set=cache.remote={}", s3_remote("nowhere"));
        let endpoint = format!("--set=cache.endpoint=http://127.0.0.1:{port}");
        let started = Instant::now();
        let out = ws.ok(&["run", &remote, &endpoint]);
        eprintln!("{what} ({:?}): {out}", started.elapsed());
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{what}: {:?}",
            started.elapsed()
        );
        assert_eq!(count(&out, "warning: remote cache"), 1, "{what}: {out}");
        assert_eq!(count(&out, ": running"), 3, "{what}: {out}");
        assert_eq!(ws.read("out/c.txt"), b"first\nsecond\nthird\n");

        // Required: the run stops before anything runs.
        let ws = Workspace::new(&chain("required = true", ""), Some(s3));
        let out = ws.pipe(&["run", &remote, &endpoint]);
        assert_eq!(out.status.code(), Some(1), "{what}: {}", text(&out));
        assert!(text(&out).contains("required = true"), "{}", text(&out));
        assert!(!ws.path("out/a.txt").exists());
    }
}

/// A TCP proxy to the S3 server that stops (closes its port, cuts open connections) when a
/// file appears or after `limit` bytes went up.
struct Proxy {
    port: u16,
    sent: Arc<AtomicU64>,
}

fn proxy(target: &str, stop_file: Option<PathBuf>, limit: Option<u64>) -> Proxy {
    let target: SocketAddr = target
        .trim_start_matches("http://")
        .parse()
        .expect("endpoint host:port");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let sent = Arc::new(AtomicU64::new(0));
    let stopped = Arc::new(AtomicBool::new(false));
    let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    let (sent2, stopped2, open2) = (sent.clone(), stopped.clone(), open.clone());
    std::thread::spawn(move || loop {
        let stop_now = stopped2.load(Ordering::SeqCst)
            || stop_file.as_ref().is_some_and(|f| f.exists())
            || limit.is_some_and(|l| sent2.load(Ordering::SeqCst) >= l);
        if stop_now {
            stopped2.store(true, Ordering::SeqCst);
            for s in open2.lock().unwrap().iter() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            return; // the listener goes: connections are refused from now on
        }
        match listener.accept() {
            Ok((client, _)) => {
                let _ = client.set_nonblocking(false);
                let Ok(upstream) = TcpStream::connect(target) else {
                    continue;
                };
                let mut open = open2.lock().unwrap();
                open.push(client.try_clone().unwrap());
                open.push(upstream.try_clone().unwrap());
                drop(open);
                let pipe =
                    |mut from: TcpStream, mut to: TcpStream, counted: Option<Arc<AtomicU64>>| {
                        let stopped = stopped2.clone();
                        std::thread::spawn(move || {
                            let mut buf = [0u8; 64 * 1024];
                            loop {
                                let n = match from.read(&mut buf) {
                                    Ok(0) | Err(_) => break,
                                    Ok(n) => n,
                                };
                                if stopped.load(Ordering::SeqCst) {
                                    break;
                                }
                                if let Some(c) = &counted {
                                    c.fetch_add(n as u64, Ordering::SeqCst);
                                }
                                if to.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                            let _ = to.shutdown(std::net::Shutdown::Both);
                            let _ = from.shutdown(std::net::Shutdown::Both);
                        });
                    };
                pipe(
                    client.try_clone().unwrap(),
                    upstream.try_clone().unwrap(),
                    Some(sent2.clone()),
                );
                pipe(upstream, client, None);
            }
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    });
    Proxy { port, sent }
}

#[test]
fn the_server_stopping_mid_run_does_not_fail_a_local_run_unless_required() {
    let Some(s3) = server("midrun") else { return };
    for required in [false, true] {
        let prefix = unique_prefix("midrun");
        let dir = tempfile::tempdir().unwrap();
        let stop = dir.path().join("stop-the-server");
        let cache = format!(
            "remote = \"{}\"\nrequired = {required}\nendpoint = \"http://127.0.0.1:{}\"",
            s3_remote(&prefix),
            proxy(&s3.endpoint, Some(stop.clone()), None).port
        );
        // Stage b stops the server, then takes a moment.
        let middle = format!("touch {} && sleep 0.5 && ", stop.display());
        let ws = Workspace::new(&chain(&cache, &middle), Some(s3));
        let out = ws.pipe(&["run", "-j", "1"]);
        let shown = text(&out);
        eprintln!("{shown}");
        assert_eq!(run_records(s3, &prefix).len(), 1, "a was pushed:\n{shown}");
        if required {
            assert_eq!(out.status.code(), Some(1), "{shown}");
            assert!(shown.contains("required = true"), "{shown}");
            assert!(!ws.path("out/c.txt").exists(), "c never started:\n{shown}");
        } else {
            assert!(out.status.success(), "{shown}");
            assert_eq!(count(&shown, "warning: remote cache"), 1, "{shown}");
            assert_eq!(ws.read("out/c.txt"), b"first\nsecond\nthird\n");
        }
        // b finished either way and is recorded.
        let lock = String::from_utf8(ws.read("pipeline.lock")).unwrap();
        assert!(lock.contains("[stages.b]"), "{lock}");
    }
}

/// Command stages writing one 24 MB file (uploaded in parts).
fn big(cache: &str) -> String {
    format!(
        r#"
[cache]
{cache}

[stages.big]
cmd = "mkdir -p out && yes fmnist-pipe-remote-cache | head -c 24000000 > out/big.bin"
outs = ["out/big.bin"]
"#
    )
}

#[test]
fn a_push_cut_off_halfway_leaves_no_run_record() {
    let Some(s3) = server("cutoff") else { return };
    let prefix = unique_prefix("cutoff");
    // The proxy dies after 10 MB went up: in the middle of the file's parts.
    let cut = proxy(&s3.endpoint, None, Some(10_000_000));
    let through_proxy = format!(
        "remote = \"{}\"\nendpoint = \"http://127.0.0.1:{}\"",
        s3_remote(&prefix),
        cut.port
    );
    let a = Workspace::new(
        &big(&format!("{through_proxy}\npush = \"manual\"")),
        Some(s3),
    );
    a.ok(&["run"]);
    let out = a.pipe(&["push"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(cut.sent.load(Ordering::SeqCst) >= 10_000_000);
    assert!(
        run_records(s3, &prefix).is_empty(),
        "no record after a cut push"
    );

    // Straight to the server: B finds nothing to restore and runs; then a whole push works.
    let direct = format!("remote = \"{}\"\npush = \"manual\"", s3_remote(&prefix));
    let b = Workspace::new(&big(&direct), Some(s3));
    let out = b.ok(&["run"]);
    assert!(out.contains("big: running"), "{out}");
    let pushed = b.ok(&["push"]);
    assert!(pushed.contains("pushed 1 run "), "{pushed}");
    assert_eq!(run_records(s3, &prefix).len(), 1);
    let c = Workspace::new(&big(&direct), Some(s3));
    let out = c.ok(&["run"]);
    assert!(out.contains("big: restored from remote"), "{out}");
    assert_eq!(c.read("out/big.bin"), b.read("out/big.bin"));
}

#[test]
fn two_workspaces_pushing_the_same_run_at_once_both_succeed() {
    let Some(s3) = server("race") else { return };
    let prefix = unique_prefix("race");
    let cache = format!("remote = \"{}\"\npush = \"manual\"", s3_remote(&prefix));
    let a = Workspace::new(&big(&cache), Some(s3));
    let b = Workspace::new(&big(&cache), Some(s3));
    a.ok(&["run"]);
    b.ok(&["run"]);
    let pushes: Vec<_> = [a.command(&["push"]), b.command(&["push"])]
        .into_iter()
        .map(|mut c| {
            c.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn push")
        })
        .collect();
    for child in pushes {
        let out = child.wait_with_output().expect("push ends");
        a.no_secret(&out);
        assert!(out.status.success(), "{}", text(&out));
    }
    assert_eq!(run_records(s3, &prefix).len(), 1);
    let c = Workspace::new(&big(&cache), Some(s3));
    let out = c.ok(&["run"]);
    assert!(out.contains("big: restored from remote"), "{out}");
    assert_eq!(c.read("out/big.bin"), a.read("out/big.bin"));
    let status = a.ok(&["status", "--remote"]);
    assert!(status.contains("local cache: yes  remote: yes"), "{status}");
}

#[test]
fn a_file_remote_shares_runs_between_workspaces() {
    let shared = tempfile::tempdir().unwrap();
    let remote = format!(
        "remote = \"file://{}\"",
        shared.path().join("cache").display()
    );
    let a = Workspace::new(&chain(&remote, ""), None);
    let first = a.ok(&["run"]);
    assert_eq!(count(&first, ": running"), 3, "{first}");
    assert!(shared.path().join("cache/runs").is_dir());
    let status = a.ok(&["status", "--remote"]);
    assert_eq!(count(&status, "remote: yes"), 3, "{status}");

    let b = Workspace::new(&chain(&remote, ""), None);
    let out = b.ok(&["run"]);
    assert_eq!(count(&out, "restored from remote"), 3, "{out}");
    assert_eq!(a.files("out"), b.files("out"));

    // --set names the remote too; push = manual keeps a run's results local until `push`.
    let other = shared.path().join("other");
    let set = format!("--set=cache.remote=file://{}", other.display());
    let c = Workspace::new(&chain("push = \"manual\"", ""), None);
    c.ok(&["run", &set]);
    assert!(!other.join("runs").exists(), "manual: nothing pushed");
    let status = c.ok(&["status", "--remote", &set]);
    assert!(status.contains("3 to push"), "{status}");
    let pushed = c.ok(&["push", "--stage", "a", &set]);
    assert!(pushed.contains("pushed 1 run "), "{pushed}");
    c.ok(&["push", &set]);
    let status = c.ok(&["status", "--remote", &set]);
    assert!(status.contains("0 to push"), "{status}");

    // No remote configured: push says how to set one.
    let d = Workspace::new(&chain("", ""), None);
    let out = d.pipe(&["push"]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("[cache]"), "{}", text(&out));
}

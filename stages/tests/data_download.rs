//! The download stage against local folders and a loopback HTTP server the test starts:
//! verified files are published, tampered ones refused, failing sources reported and the
//! next one tried, interrupted downloads resumed.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use fmnist_stages::data::{Dataset, Split};
use fmnist_stages::download::{self, Expect, Params, FIXTURE_SUBSET};
use fmnist_stages::{Progress, StageContext};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/fashion-mnist")
}

/// Records what the stage reports, to check that failing sources are named.
#[derive(Default)]
struct Recorder(Mutex<Vec<String>>);

impl Progress for Recorder {
    fn start(&self, _: &str, _: u64, _: &str) {}
    fn advance(&self, _: u64) {}
    fn message(&self, _: &str) {}
    fn finish(&self, line: &str) {
        self.0.lock().unwrap().push(line.to_string());
    }
    fn println(&self, line: &str) {
        self.0.lock().unwrap().push(line.to_string());
    }
}

struct Run {
    out: tempfile::TempDir,
    scratch: tempfile::TempDir,
    progress: Recorder,
    cancel: AtomicBool,
}

impl Run {
    fn new() -> Self {
        Run {
            out: tempfile::tempdir().unwrap(),
            scratch: tempfile::tempdir().unwrap(),
            progress: Recorder::default(),
            cancel: AtomicBool::new(false),
        }
    }

    fn download(&self, sources: Vec<String>, expect: Expect) -> anyhow::Result<serde_json::Value> {
        let ctx = StageContext {
            name: "download",
            inputs: &[],
            out_dir: self.out.path(),
            scratch_dir: self.scratch.path(),
            continue_dir: None,
            device: "cpu",
            kernels: fmnist_stages::ops::Kernels::Fast,
            seed: 42,
            progress: &self.progress,
            cancel: &self.cancel,
        };
        let params = Params {
            sources,
            expect,
            retries: 1,
            timeout_secs: 5,
        };
        download::run(params, &ctx)
    }

    fn published(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.out.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn lines(&self) -> String {
        self.progress.0.lock().unwrap().join("\n")
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

fn all_four() -> Vec<String> {
    let mut v: Vec<String> = FIXTURE_SUBSET.iter().map(|f| f.name.to_string()).collect();
    v.sort();
    v
}

/// A copy of the fixture folder with one file's decompressed content altered (stored
/// plain, which the stage accepts as well).
fn tampered_fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in FIXTURE_SUBSET {
        let gz = format!("{}.gz", f.name);
        std::fs::copy(fixture_dir().join(&gz), dir.path().join(&gz)).unwrap();
    }
    let labels = "train-labels-idx1-ubyte";
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(
        std::fs::File::open(fixture_dir().join(format!("{labels}.gz"))).unwrap(),
    )
    .read_to_end(&mut bytes)
    .unwrap();
    bytes[100] = (bytes[100] + 1) % 10; // one relabelled image
    std::fs::remove_file(dir.path().join(format!("{labels}.gz"))).unwrap();
    std::fs::write(dir.path().join(labels), bytes).unwrap();
    dir
}

#[test]
fn fixture_folder_yields_verified_plain_idx_files() {
    let run = Run::new();
    let metrics = run
        .download(
            vec![fixture_dir().display().to_string()],
            Expect::FixtureSubset,
        )
        .unwrap();
    assert_eq!(run.published(), all_four());
    for f in FIXTURE_SUBSET {
        let bytes = std::fs::read(run.out.path().join(f.name)).unwrap();
        assert_eq!(bytes.len() as u64, f.size);
        assert_eq!(sha256_hex(&bytes), f.sha256);
    }
    assert_eq!(metrics["train_images"], 1000);
    assert_eq!(
        Dataset::load(run.out.path(), Split::Test).unwrap().len(),
        500
    );
}

#[test]
fn absent_folder_is_reported_and_the_next_source_used() {
    let run = Run::new();
    let sources = vec![
        "/nonexistent/fashion".to_string(),
        fixture_dir().display().to_string(),
    ];
    let metrics = run.download(sources, Expect::FixtureSubset).unwrap();
    assert_eq!(run.published(), all_four());
    assert!(run
        .lines()
        .contains("/nonexistent/fashion: folder /nonexistent/fashion does not exist"));
    let used = metrics["files"]["train-images-idx3-ubyte"]["source"]
        .as_str()
        .unwrap();
    assert!(used.ends_with("fashion-mnist"), "{used}");
}

#[test]
fn tampered_file_is_refused_and_never_published() {
    let run = Run::new();
    let bad = tampered_fixture();
    let e = run
        .download(
            vec![bad.path().display().to_string()],
            Expect::FixtureSubset,
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("checksum mismatch for train-labels-idx1-ubyte"),
        "{e}"
    );
    assert!(e.contains("dataset-fashion-mnist"), "{e}");
    // The images came before the labels and are verified; nothing else, nothing partial.
    assert_eq!(run.published(), vec!["train-images-idx3-ubyte".to_string()]);
}

#[test]
fn a_tampered_source_falls_back_to_a_good_one() {
    let run = Run::new();
    let bad = tampered_fixture();
    run.download(
        vec![
            bad.path().display().to_string(),
            fixture_dir().display().to_string(),
        ],
        Expect::FixtureSubset,
    )
    .unwrap();
    assert_eq!(run.published(), all_four());
    assert!(run.lines().contains("checksum mismatch"), "{}", run.lines());
}

#[test]
fn subset_files_do_not_pass_as_the_full_dataset() {
    let run = Run::new();
    let e = run
        .download(vec![fixture_dir().display().to_string()], Expect::Full)
        .unwrap_err()
        .to_string();
    assert!(e.contains("784016 bytes, expected 47040016"), "{e}");
    assert!(run.published().is_empty());
}

#[test]
fn cancelled_before_start_returns_cancelled() {
    let run = Run::new();
    run.cancel.store(true, Ordering::Relaxed);
    let e = run
        .download(
            vec![fixture_dir().display().to_string()],
            Expect::FixtureSubset,
        )
        .unwrap_err();
    assert!(
        e.downcast_ref::<fmnist_stages::Cancelled>().is_some(),
        "{e}"
    );
}

// ---- a loopback HTTP server ----

#[derive(Clone)]
enum Route {
    /// Serves the bytes, honouring `Range: bytes=N-`.
    Bytes(Vec<u8>),
    /// The first request gets the headers and only this many body bytes, then the
    /// connection closes; later requests are served like `Bytes`.
    DropOnce(Vec<u8>, usize),
}

struct Server {
    base: String,
    /// "PATH RANGE" of each request, in order.
    log: Arc<Mutex<Vec<String>>>,
}

fn serve(routes: HashMap<String, Route>) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&log);
    std::thread::spawn(move || {
        let dropped = Mutex::new(std::collections::HashSet::new());
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let _ = handle(stream, &routes, &seen, &dropped);
        }
    });
    Server { base, log }
}

fn handle(
    mut stream: TcpStream,
    routes: &HashMap<String, Route>,
    log: &Mutex<Vec<String>>,
    dropped: &Mutex<std::collections::HashSet<String>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .to_string();
    let mut range_start = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
            range_start = v.trim().trim_end_matches('-').parse::<usize>().ok();
        }
    }
    log.lock().unwrap().push(format!(
        "{path} {}",
        range_start.map_or("-".into(), |r| r.to_string())
    ));
    let route = routes.get(&path).cloned();
    let (body, cut) = match route {
        None => {
            let msg = "not here";
            write!(
                stream,
                "HTTP/1.1 404 Not Found\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{msg}",
                msg.len()
            )?;
            return Ok(());
        }
        Some(Route::Bytes(b)) => (b, None),
        Some(Route::DropOnce(b, n)) => {
            let first = dropped.lock().unwrap().insert(path.clone());
            (b, first.then_some(n))
        }
    };
    let start = range_start.unwrap_or(0);
    if start >= body.len() && start > 0 {
        write!(
            stream,
            "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        return Ok(());
    }
    let status = if start > 0 {
        "206 Partial Content"
    } else {
        "200 OK"
    };
    let rest = &body[start..];
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: application/gzip\r\nConnection: close\r\n\r\n",
        rest.len()
    )?;
    match cut {
        Some(n) => stream.write_all(&rest[..n.min(rest.len())])?,
        None => stream.write_all(rest)?,
    }
    stream.flush()
}

fn fixture_routes(prefix: &str) -> HashMap<String, Route> {
    FIXTURE_SUBSET
        .iter()
        .map(|f| {
            let bytes = std::fs::read(fixture_dir().join(format!("{}.gz", f.name))).unwrap();
            (format!("{prefix}/{}.gz", f.name), Route::Bytes(bytes))
        })
        .collect()
}

/// A port nothing listens on (bound, then released).
fn dead_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/data/", l.local_addr().unwrap());
    drop(l);
    url
}

#[test]
fn http_dead_server_404_and_corrupt_file_fall_through_to_a_good_mirror() {
    let mut routes = fixture_routes("/good");
    let mut corrupt = std::fs::read(fixture_dir().join("train-images-idx3-ubyte.gz")).unwrap();
    let n = corrupt.len();
    corrupt[n / 2] ^= 0xff; // breaks the deflate stream or its CRC
    routes.insert(
        "/corrupt/train-images-idx3-ubyte.gz".into(),
        Route::Bytes(corrupt),
    );
    let server = serve(routes);
    let dead = dead_url();
    let sources = vec![
        dead.clone(),
        format!("{}/missing/", server.base),
        format!("{}/corrupt", server.base),
        format!("{}/good/", server.base),
    ];
    let run = Run::new();
    let metrics = run.download(sources, Expect::FixtureSubset).unwrap();
    assert_eq!(run.published(), all_four());
    let used = metrics["files"]["t10k-labels-idx1-ubyte"]["source"]
        .as_str()
        .unwrap();
    assert!(used.ends_with("/good/"), "{used}");
    let lines = run.lines();
    assert!(lines.contains(&format!("{dead}: ")), "{lines}");
    assert!(lines.contains("HTTP 404"), "{lines}");
    assert!(
        lines.contains("corrupt gzip data") || lines.contains("checksum mismatch"),
        "{lines}"
    );
    // The dead source is not retried for every file once known unreachable... and no
    // partial download is left in the output folder.
    assert!(!run.published().iter().any(|n| n.contains("partial")));
}

#[test]
fn http_all_sources_failing_lists_each_with_its_reason() {
    let mut corrupt = std::fs::read(fixture_dir().join("train-images-idx3-ubyte.gz")).unwrap();
    corrupt.truncate(corrupt.len() / 3);
    let mut routes = HashMap::new();
    routes.insert(
        "/short/train-images-idx3-ubyte.gz".to_string(),
        Route::Bytes(corrupt),
    );
    let server = serve(routes);
    let dead = dead_url();
    let sources = vec![
        "/nonexistent/fashion".to_string(),
        dead.clone(),
        format!("{}/missing/", server.base),
        format!("{}/short/", server.base),
    ];
    let run = Run::new();
    let e = run
        .download(sources, Expect::FixtureSubset)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("could not get a verified train-images-idx3-ubyte from any source"),
        "{e}"
    );
    assert!(
        e.contains("/nonexistent/fashion: folder /nonexistent/fashion does not exist"),
        "{e}"
    );
    assert!(e.contains(&format!("{dead}: ")), "{e}");
    assert!(e.contains("missing/: ") && e.contains("HTTP 404"), "{e}");
    assert!(e.contains("short/: ") && e.contains("corrupt gzip"), "{e}");
    assert!(
        e.contains("dataset-fashion-mnist") && e.contains("sources"),
        "{e}"
    );
    assert!(run.published().is_empty(), "{:?}", run.published());
}

#[test]
fn http_interrupted_download_resumes_with_a_range_request() {
    let mut routes = fixture_routes("/m");
    let name = "train-images-idx3-ubyte.gz";
    let bytes = std::fs::read(fixture_dir().join(name)).unwrap();
    let half = bytes.len() / 2;
    routes.insert(format!("/m/{name}"), Route::DropOnce(bytes, half));
    let server = serve(routes);
    let run = Run::new();
    run.download(vec![format!("{}/m", server.base)], Expect::FixtureSubset)
        .unwrap();
    assert_eq!(run.published(), all_four());
    let log = server.log.lock().unwrap().clone();
    let for_images: Vec<&String> = log.iter().filter(|l| l.contains(name)).collect();
    assert_eq!(for_images.len(), 2, "{log:?}");
    assert_eq!(for_images[0], &format!("/m/{name} -"));
    assert_eq!(for_images[1], &format!("/m/{name} {half}"));
    assert!(run.lines().contains("resumed after"), "{}", run.lines());
}

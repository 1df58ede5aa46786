//! Property tests (issue 12): whatever the pipeline file, the lock, its journal or a `--set`
//! holds, `config::load`, `lock::read`, `Override::from_str`, `Workspace::load` and `status`
//! return Ok or Err: never a panic, never a stack overflow. Inputs are arbitrary text and
//! bytes, and realistic files (the study's pipeline.toml, a command-stage diamond and the lock
//! a run of it wrote) with lines deleted, duplicated and swapped and tokens inserted.
//! Test-only and over 500 lines: the realistic inputs are inline fixtures, kept next to the
//! properties that mutate them.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::sample::{select, Index};
use tempfile::TempDir;

use crate::config::{self, Override};
use crate::lock;
use crate::plan;
use crate::registry::Registry;
use crate::workspace::Workspace;

const STUDY: &str = include_str!("../pipeline.toml");

/// The command-stage pipeline of tests/engine_cli.rs.
const DIAMOND: &str = r#"
[stages.a]
cmd = "echo a >> runs.log; echo A > a.txt"
outs = ["a.txt"]

[stages.b]
cmd = "echo b >> runs.log; cat a.txt > b.txt; echo B >> b.txt"
deps = ["a.txt"]
outs = ["b.txt"]

[stages.c]
cmd = "echo c >> runs.log; mkdir -p c && cat a.txt > c/out.txt"
needs = ["a"]
outs = ["c"]

[stages.d]
cmd = "echo d >> runs.log; cat b.txt c/out.txt > d.txt"
needs = ["b", "c"]
outs = ["d.txt"]
"#;

/// The files a run of DIAMOND leaves (besides runs.log).
const DIAMOND_OUTS: &[(&str, &str)] = &[
    ("a.txt", "A\n"),
    ("b.txt", "A\nB\n"),
    ("c/out.txt", "A\n"),
    ("d.txt", "A\nB\nA\n"),
];

/// The pipeline.lock `fmnist-pipe run` wrote for DIAMOND.
const DIAMOND_LOCK: &str = r#"# pipeline.lock: written by fmnist-pipe after each stage succeeds. Commit it; do not edit it.

format = 1

[stages.a]
kind = "cmd"
version = 0
fingerprint = "fa5535f30968e11c126aa1cf262dda5516a055e38d7537cf090a5d6a36a3deee"
outs_hash = "673169035557fb439d4dc0808bb5d7dc94135b596d601ce313c6a91012d75470"
seconds = 0.017

[stages.a.params]
cmd = "echo a >> runs.log; echo A > a.txt"
deps = []
outs = ["a.txt"]

[[stages.a.outs]]
path = "a.txt"
size = 2
mtime_ns = 1796189660130843025
blake3 = "753dcb144663fe5ca9e0bc97b1549104a3008f2f541792d67a64fcc614ef83c9"

[stages.b]
kind = "cmd"
version = 0
fingerprint = "afb39f3915a45ef496065cdbcc7a912cf559a4087dea800e22c665120c8cc05a"
outs_hash = "7f5b715e81be9e769a837efb9b93391afc1512f523e32e7eacffbe71c6271bd7"
seconds = 0.015

[stages.b.params]
cmd = "echo b >> runs.log; cat a.txt > b.txt; echo B >> b.txt"
deps = ["a.txt"]
outs = ["b.txt"]

[[stages.b.deps]]
path = "a.txt"
size = 2
mtime_ns = 1796189660130843025
blake3 = "753dcb144663fe5ca9e0bc97b1549104a3008f2f541792d67a64fcc614ef83c9"

[[stages.b.outs]]
path = "b.txt"
size = 4
mtime_ns = 1796189660150843026
blake3 = "6d579633aa4439ef6377e53e4cad196e9ea6e1dbfd1662def28396485948fb17"

[stages.c]
kind = "cmd"
version = 0
fingerprint = "29dc63060e94fec02f073a3d2d5fffaf8311f3f1557cbf0ce792b38f876109d9"
outs_hash = "ea8d4d761c52cf0f8ee49220c5e79b2a56c541a5dcefdf682bbb97566906789e"
seconds = 0.02

[stages.c.params]
cmd = "echo c >> runs.log; mkdir -p c && cat a.txt > c/out.txt"
deps = []
outs = ["c"]

[stages.c.upstream]
a = "673169035557fb439d4dc0808bb5d7dc94135b596d601ce313c6a91012d75470"

[[stages.c.outs]]
path = "c/out.txt"
size = 2
mtime_ns = 1796189660155470578
blake3 = "753dcb144663fe5ca9e0bc97b1549104a3008f2f541792d67a64fcc614ef83c9"

[stages.d]
kind = "cmd"
version = 0
fingerprint = "b5df60fbf3182ca8dbef00b8e1ef7814b401f4b6cbcf1f82c28d535720d10671"
outs_hash = "c4071532daa459a6f3d0a6982ae8200c0f19706f9e4fc07083860ef0781163c3"
seconds = 0.006

[stages.d.params]
cmd = "echo d >> runs.log; cat b.txt c/out.txt > d.txt"
deps = []
outs = ["d.txt"]

[stages.d.upstream]
b = "7f5b715e81be9e769a837efb9b93391afc1512f523e32e7eacffbe71c6271bd7"
c = "ea8d4d761c52cf0f8ee49220c5e79b2a56c541a5dcefdf682bbb97566906789e"

[[stages.d.outs]]
path = "d.txt"
size = 6
mtime_ns = 1796189660164668325
blake3 = "91bbec19d2edc4a737df15a9d5fbf95471a1a1c04675192fa5f1b3415d211542"
"#;

/// The stack of the program's main thread (ulimit -s 8192); test threads get 2 MiB.
const MAIN_STACK: usize = 8 << 20;

// ---------------------------------------------------------------------------------------------
// Workspaces on disk

struct Dir {
    dir: TempDir,
}

impl Dir {
    fn new() -> Dir {
        Dir {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn pipeline(&self) -> PathBuf {
        self.dir.path().join("pipeline.toml")
    }

    fn lock(&self) -> PathBuf {
        lock::lock_path(&self.pipeline())
    }

    fn journal(&self) -> PathBuf {
        lock::journal_path(&self.lock())
    }

    fn write(&self, path: &Path, bytes: impl AsRef<[u8]>) {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create folder");
        }
        std::fs::write(path, bytes).expect("write file");
    }

    /// DIAMOND's outputs, so that its lock reads as up to date.
    fn diamond_outputs(&self) {
        for (rel, text) in DIAMOND_OUTS {
            self.write(&self.dir.path().join(rel), text);
        }
    }
}

fn load_bytes(bytes: &[u8], overrides: &[Override]) -> Result<config::Pipeline, String> {
    let dir = Dir::new();
    dir.write(&dir.pipeline(), bytes);
    config::load(&dir.pipeline(), overrides, &Registry::builtins()).map_err(|e| e.to_string())
}

/// Loads the workspace and, when it loads, computes every stage's status.
fn load_and_status(dir: &Dir, overrides: &[Override]) -> Result<Vec<String>, String> {
    let ws = Workspace::load(&dir.pipeline(), overrides, Registry::builtins())
        .map_err(|e| e.to_string())?;
    let planned = plan::plan(&ws, None, &Default::default(), None);
    Ok(plan::status(&ws, &planned)
        .into_iter()
        .map(|s| format!("{} {}", s.stage, s.state))
        .collect())
}

/// Runs `f` on a thread with the main thread's stack, as the program runs it.
fn on_main_sized_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::Builder::new()
        .stack_size(MAIN_STACK)
        .spawn(f)
        .expect("spawn")
        .join()
        .expect("no panic")
}

// ---------------------------------------------------------------------------------------------
// Mutations

#[derive(Debug, Clone)]
enum Edit {
    Delete(Index),
    Duplicate(Index),
    Swap(Index, Index),
    /// `token` inserted inside a line, at a char boundary.
    Insert(Index, Index, String),
    /// `token` as a line of its own.
    NewLine(Index, String),
    /// Everything from this line on dropped (a file cut short).
    Truncate(Index),
    /// The value of a `key = value` line replaced (the file stays TOML more often).
    Value(Index, String),
}

fn apply(text: &str, edits: &[Edit]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    for edit in edits {
        if lines.is_empty() {
            lines.push(String::new());
        }
        let n = lines.len();
        match edit {
            Edit::Delete(i) => {
                lines.remove(i.index(n));
            }
            Edit::Duplicate(i) => {
                let i = i.index(n);
                lines.insert(i, lines[i].clone());
            }
            Edit::Swap(a, b) => lines.swap(a.index(n), b.index(n)),
            Edit::Insert(line, col, token) => {
                let line = &mut lines[line.index(n)];
                let cuts: Vec<usize> = line
                    .char_indices()
                    .map(|(i, _)| i)
                    .chain([line.len()])
                    .collect();
                line.insert_str(cuts[col.index(cuts.len())], token);
            }
            Edit::NewLine(i, token) => lines.insert(i.index(n + 1), token.clone()),
            Edit::Truncate(i) => lines.truncate(i.index(n)),
            Edit::Value(i, value) => {
                let line = &mut lines[i.index(n)];
                if let Some(eq) = line.find(" = ") {
                    line.replace_range(eq + 3.., value);
                }
            }
        }
    }
    lines.join("\n")
}

/// Tokens that mean something to TOML or to the engine.
const TOKENS: &[&str] = &[
    "[",
    "]",
    "[[",
    "]]",
    "{",
    "}",
    "=",
    "==",
    "\"",
    "'",
    "\"\"\"",
    "'''",
    ",",
    ".",
    "#",
    "\\",
    "\\u",
    "\\uD800",
    "\\U0010FFFF",
    "\\U00110000",
    "\n",
    "\r",
    "\r\n",
    "\t",
    "\u{0}",
    "\u{7f}",
    "\u{feff}",
    "\u{202e}",
    "\u{10ffff}",
    "日本語",
    "🦀",
    "e\u{301}",
    "needs = [\"x\"]",
    "needs = [\"a\"]",
    "needs = [\"a\", \"a\"]",
    "needs = [\"d\"]",
    "needs = [\"report\"]",
    "needs = []",
    "needs = \"a\"",
    "needs = [1]",
    "kind = 3",
    "kind = \"nope\"",
    "kind = \"cmd\"",
    "kind = \"stats\"",
    "kind = \"train\"",
    "kind = \"download\"",
    "kind = \"evaluate\"",
    "kind = \"visualize\"",
    "kind = \"report\"",
    "cmd = \"true\"",
    "cmd = \"\"",
    "cmd = \"  \"",
    "cmd = 1",
    "cmd = []",
    "outs = [\"../x\"]",
    "outs = [\"/etc\"]",
    "outs = [\"\"]",
    "outs = [\".\"]",
    "outs = [\"./\"]",
    "outs = [\"a.txt\"]",
    "outs = [\"a.txt/x\"]",
    "outs = [\"c/out.txt\"]",
    "outs = [\"pipeline.toml\"]",
    "outs = [\"pipeline.lock\"]",
    "outs = [\"pipeline.lock.journal\"]",
    "outs = [\"artifacts\"]",
    "outs = [\"artifacts/.cache\"]",
    "outs = [\"artifacts/x\"]",
    "outs = \"x\"",
    "deps = [\"a.txt\"]",
    "deps = [\"..\"]",
    "deps = [\"/\"]",
    "deps = [\"pipeline.toml\"]",
    "deps = [\"pipeline.lock\"]",
    "deps = [\"c\"]",
    "deps = [\"nope/x\"]",
    "[stages.a]",
    "[stages.x]",
    "[stages.pipeline]",
    "[stages.\"\"]",
    "[stages.\"a b\"]",
    "[stages.\"é\"]",
    "[stages.a.b]",
    "[[stages.a]]",
    "[pipeline]",
    "[pipeline.x]",
    "[[stages]]",
    "[stages]",
    "[other]",
    "stages = 1",
    "stages = {}",
    "pipeline = []",
    "pipeline = 1",
    "seed = -1",
    "seed = 0",
    "seed = 9223372036854775807",
    "seed = 9223372036854775808",
    "seed = 1.5",
    "device = \"cpu\"",
    "device = \"cuda:18446744073709551616\"",
    "device = \"cuda:\"",
    "device = \"cuda:-1\"",
    "device = 3",
    "kernels = \"portable\"",
    "kernels = \"x\"",
    "kernels = 1",
    "epochs = 0",
    "epochs = -1",
    "epochs = 18446744073709551615",
    "batch_size = 0",
    "batch_size = -64",
    "lr = nan",
    "lr = inf",
    "lr = -inf",
    "lr = 1e308",
    "lr = -0.0",
    "lr_decay = 0",
    "lr_decay = 2.0",
    "optimizer = { name = \"sgd\" }",
    "optimizer = { name = \"adam\", lr = -1 }",
    "optimizer = {}",
    "optimizer = \"adam\"",
    "model = \"resnet18\"",
    "model = \"nope\"",
    "model = 1",
    "samples_per_class = 0",
    "samples_per_class = -1",
    "sources = []",
    "sources = [\"\"]",
    "sources = [\"../../..\"]",
    "sources = [\"file:///etc/passwd\"]",
    "x = 1979-05-27T07:32:00Z",
    "x = 1979-05-27",
    "x = 07:32:00",
    "x = 0x7fffffff",
    "x = 1_000",
    "x = true",
    "a.b.c = 1",
    "format = 2",
    "format = 0",
    "format = -1",
    "format = 9223372036854775807",
    "format = \"1\"",
    "size = -1",
    "mtime_ns = 9223372036854775808",
    "[[stages.a.outs]]",
    "[[stages.a.deps]]",
    "[stages.a.upstream]",
    "[stages.a.metrics]",
    "path = \"../x\"",
    "path = \"/etc/passwd\"",
    "fingerprint = \"\"",
    "outs_hash = 1",
];

fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => select(TOKENS).prop_map(str::to_string),
        1 => "\\PC{1,8}",
        1 => "[a-zA-Z0-9_-]{100,400}",
        1 => "[a-zA-Z0-9_-]{120,140}".prop_map(|n| format!("[stages.{n}]\ncmd = \"true\"")),
        1 => (1000usize..4000).prop_map(|d| format!("x = {}{}", "[".repeat(d), "]".repeat(d))),
        1 => (1000usize..4000).prop_map(|d| "[".repeat(d)),
        1 => (1000usize..4000).prop_map(|d| format!("x = {}1{}", "{a = ".repeat(d), "}".repeat(d))),
        1 => (100usize..4000).prop_map(|d| format!("{} = 1", vec!["k"; d].join("."))),
        1 => (100usize..4000).prop_map(|d| format!("[stages.{}]", vec!["k"; d].join("."))),
    ]
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        2 => any::<Index>().prop_map(Edit::Delete),
        2 => any::<Index>().prop_map(Edit::Duplicate),
        2 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Edit::Swap(a, b)),
        4 => (any::<Index>(), any::<Index>(), token()).prop_map(|(l, c, t)| Edit::Insert(l, c, t)),
        3 => (any::<Index>(), token()).prop_map(|(l, t)| Edit::NewLine(l, t)),
        1 => any::<Index>().prop_map(Edit::Truncate),
        4 => (any::<Index>(), value()).prop_map(|(l, v)| Edit::Value(l, v)),
    ]
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    prop::collection::vec(edit(), 1..6)
}

/// Bytes overwritten or inserted anywhere (non-UTF-8 included).
fn byte_edits() -> impl Strategy<Value = Vec<(Index, u8, bool)>> {
    prop::collection::vec((any::<Index>(), any::<u8>(), any::<bool>()), 1..6)
}

fn apply_bytes(text: &str, edits: &[(Index, u8, bool)]) -> Vec<u8> {
    let mut bytes = text.as_bytes().to_vec();
    for (at, byte, insert) in edits {
        if *insert || bytes.is_empty() {
            let i = at.index(bytes.len() + 1);
            bytes.insert(i, *byte);
        } else {
            let i = at.index(bytes.len());
            bytes[i] = *byte;
        }
    }
    bytes
}

/// Text that looks like TOML more often than arbitrary text does.
fn tomlish() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,300}",
        "[\\[\\]{}=\"'.,#a-z0-9 \n\t_-]{0,400}",
        prop::collection::vec(token(), 0..12).prop_map(|t| t.join("\n")),
    ]
}

// ---------------------------------------------------------------------------------------------
// Journal lines

/// One valid journal line per stage of DIAMOND's lock, as a run appends them.
fn journal_lines() -> Vec<String> {
    let dir = Dir::new();
    dir.write(&dir.lock(), DIAMOND_LOCK);
    let (lock, warning) = lock::read(&dir.lock()).expect("DIAMOND_LOCK reads");
    assert!(warning.is_none(), "{warning:?}");
    lock.stages
        .iter()
        .map(|(stage, entry)| serde_json::json!({ "stage": stage, "entry": entry }).to_string())
        .collect()
}

fn journal_line() -> impl Strategy<Value = String> {
    let valid = journal_lines();
    prop_oneof![
        select(valid.clone()),
        (select(valid.clone()), any::<Index>()).prop_map(|(l, i)| {
            // Torn: cut at a char boundary (lines are ASCII).
            let n = i.index(l.len() + 1);
            l[..n].to_string()
        }),
        (select(valid), any::<Index>(), select(TOKENS)).prop_map(|(l, i, t)| {
            let mut l = l;
            l.insert_str(i.index(l.len() + 1), t);
            l
        }),
        "\\PC{0,200}",
        "[\\[\\]{}\":,0-9a-z ]{0,200}",
        (100usize..5000).prop_map(|d| format!("{}{}", "[".repeat(d), "]".repeat(d))),
        (100usize..5000).prop_map(|d| {
            format!("{{\"stage\":\"a\",\"entry\":{}1{}}}", "{\"a\":".repeat(d), "}".repeat(d))
        }),
        Just("{\"stage\":\"a\",\"entry\":{\"kind\":\"cmd\",\"version\":0,\"fingerprint\":\"\",\"outs_hash\":\"\",\"outs\":[{\"path\":\"../x\",\"size\":18446744073709551615,\"mtime_ns\":-9223372036854775808,\"blake3\":\"\"}]}}".to_string()),
    ]
}

// ---------------------------------------------------------------------------------------------
// --set

const STAGE_NAMES: &[&str] = &[
    "a",
    "b",
    "c",
    "d",
    "download",
    "stats",
    "train-baseline",
    "train-resnet",
    "evaluate",
    "visualize",
    "report",
    "pipeline",
    "nope",
    "",
    " ",
];

const KEYS: &[&str] = &[
    "cmd",
    "deps",
    "outs",
    "needs",
    "kind",
    "device",
    "kernels",
    "seed",
    "epochs",
    "batch_size",
    "optimizer",
    "optimizer.name",
    "optimizer.lr",
    "lr_decay",
    "model",
    "sources",
    "samples_per_class",
    "x",
    "x.y",
    "needs.x",
    "cmd.x",
    "",
    " ",
];

const VALUES: &[&str] = &[
    "1",
    "0",
    "-1",
    "1.5",
    "nan",
    "inf",
    "9223372036854775808",
    "true",
    "cpu",
    "cuda:1",
    "cuda:x",
    "portable",
    "\"a\"",
    "'a'",
    "\"",
    "'",
    "[]",
    "[\"a\"]",
    "[\"../x\"]",
    "[\"artifacts\"]",
    "[\"pipeline.toml\"]",
    "[\"d\"]",
    "[1, \"a\"]",
    "{}",
    "{ name = \"sgd\" }",
    "{ name = \"adam\", lr = -1 }",
    "{ x = { y = 1 } }",
    "1979-05-27",
    "a b",
    "x = 1",
    "1\nv = 2",
    "1 # comment",
    "",
    " ",
    "=",
    "[[[[",
    "\u{0}",
    "🦀",
];

/// A value for a `key = value` line or a `--set`.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => select(VALUES).prop_map(str::to_string),
        2 => "-?[0-9]{1,4}",
        1 => "-?[0-9]{1,3}\\.[0-9]{1,3}(e-?[0-9]{1,3})?",
        1 => "\"[a-z0-9./ _-]{0,12}\"",
        1 => prop::collection::vec("\"[a-z0-9./_-]{0,8}\"", 0..4)
            .prop_map(|v| format!("[{}]", v.join(", "))),
        1 => token(),
    ]
}

/// Keys that exist, in the stage (or `pipeline`) that has them, and a value that loads.
const PLAUSIBLE: &[(&str, &str, &str)] = &[
    ("pipeline", "seed", "7"),
    ("pipeline", "device", "cpu"),
    ("pipeline", "kernels", "portable"),
    ("download", "sources", "[\"/nope\"]"),
    ("stats", "samples_per_class", "3"),
    ("stats", "needs", "[\"download\"]"),
    ("train-baseline", "epochs", "2"),
    ("train-baseline", "batch_size", "32"),
    ("train-baseline", "lr_decay", "0.5"),
    ("train-baseline", "optimizer.lr", "0.5"),
    ("train-baseline", "optimizer.name", "sgd"),
    ("train-resnet", "optimizer", "{ name = \"sgd\", lr = 0.1 }"),
    ("train-resnet", "model", "baseline"),
    ("train-resnet", "needs", "[\"download\", \"stats\"]"),
    (
        "evaluate",
        "needs",
        "[\"download\", \"train-baseline\", \"train-resnet\"]",
    ),
    (
        "report",
        "needs",
        "[\"stats\", \"train-baseline\", \"train-resnet\", \"evaluate\", \"visualize\"]",
    ),
    ("a", "cmd", "true"),
    ("a", "outs", "[\"a.txt\", \"a2\"]"),
    ("b", "deps", "[\"c/out.txt\"]"),
    ("b", "needs", "[\"a\"]"),
    ("c", "outs", "[\"c\", \"c2/x\"]"),
    ("d", "needs", "[\"b\"]"),
    ("d", "deps", "[\"b.txt\", \"c\"]"),
];

/// `STAGE.KEY=VALUE` for a key that exists; the value fits it half the time.
fn plausible_set() -> impl Strategy<Value = String> {
    (
        select(PLAUSIBLE),
        prop_oneof![Just(None), value().prop_map(Some)],
    )
        .prop_map(|((stage, key, good), v)| {
            format!("{stage}.{key}={}", v.as_deref().unwrap_or(good))
        })
}

fn set_arg() -> impl Strategy<Value = String> {
    prop_oneof![
        plausible_set(),
        plausible_set()
            .prop_map(|s| format!(" {} ", s.replace('.', " . ").replacen('=', " = ", 1))),
        "\\PC{0,80}",
        "[a-z. =\"'\\[\\]{},0-9:_-]{0,60}",
        (
            select(STAGE_NAMES),
            select(KEYS),
            prop::collection::vec("[a-z]{1,3}", 0..4),
            select(VALUES),
        )
            .prop_map(|(stage, key, more, value)| {
                let mut key = key.to_string();
                for k in more {
                    key = format!("{key}.{k}");
                }
                format!("{stage}.{key}={value}")
            }),
        (select(STAGE_NAMES), "[a-z.]{0,20}", token())
            .prop_map(|(stage, key, value)| format!("{stage}.{key}={value}")),
        (1000usize..4000).prop_map(|d| format!("a.x={}{}", "[".repeat(d), "]".repeat(d))),
        (1000usize..4000).prop_map(|d| format!("a.x={}", "[".repeat(d))),
    ]
}

fn overrides() -> impl Strategy<Value = Vec<Override>> {
    prop_oneof![
        prop::collection::vec(set_arg(), 0..4),
        prop::collection::vec(plausible_set(), 1..3),
    ]
    .prop_map(|args| args.iter().filter_map(|a| a.parse().ok()).collect())
}

// ---------------------------------------------------------------------------------------------
// Fixed inputs: the bases are valid, and deep nesting is an error, not a stack overflow

#[test]
fn the_bases_are_valid() {
    for base in [STUDY, DIAMOND] {
        let pipeline = load_bytes(base.as_bytes(), &[]).expect("base pipeline loads");
        assert!(!pipeline.stages.is_empty());
    }
    let dir = Dir::new();
    dir.write(&dir.pipeline(), DIAMOND);
    dir.diamond_outputs();
    dir.write(&dir.lock(), DIAMOND_LOCK);
    let states = load_and_status(&dir, &[]).expect("DIAMOND loads");
    assert_eq!(
        states,
        [
            "a up to date",
            "b up to date",
            "c up to date",
            "d up to date"
        ]
    );
    assert_eq!(journal_lines().len(), 4);
}

#[test]
fn deep_nesting_in_a_pipeline_is_an_error() {
    on_main_sized_stack(|| {
        for depth in [100, 5_000, 100_000] {
            let open = "[".repeat(depth);
            let close = "]".repeat(depth);
            let keys = vec!["k"; depth].join(".");
            let texts = [
                format!("{DIAMOND}\nx = {open}{close}\n"),
                format!("{DIAMOND}\nx = {open}\n"),
                format!(
                    "{DIAMOND}\nx = {}1{}\n",
                    "{a = ".repeat(depth),
                    "}".repeat(depth)
                ),
                format!("{DIAMOND}\n{keys} = 1\n"),
                format!("{DIAMOND}\n[stages.a.{keys}]\n"),
                format!("[stages.a]\nkind = \"stats\"\n{keys} = 1\n"),
                format!("{open}{close}"),
            ];
            for text in texts {
                assert!(load_bytes(text.as_bytes(), &[]).is_err(), "depth {depth}");
            }
        }
    });
}

#[test]
fn deep_nesting_in_a_lock_or_journal_is_an_error() {
    on_main_sized_stack(|| {
        for depth in [100, 5_000, 100_000] {
            let dir = Dir::new();
            let keys = vec!["k"; depth].join(".");
            for text in [
                format!("format = 1\n[stages.a.params]\n{keys} = 1\n"),
                format!(
                    "format = 1\nx = {}{}\n",
                    "[".repeat(depth),
                    "]".repeat(depth)
                ),
            ] {
                dir.write(&dir.lock(), text);
                let (lock, warning) = lock::read(&dir.lock()).expect("a damaged lock reads");
                assert!(lock.stages.is_empty() && warning.is_some());
            }
            std::fs::remove_file(dir.lock()).expect("remove lock");
            let line = format!(
                "{{\"stage\":\"a\",\"entry\":{}1{}}}\n{}{}\n",
                "{\"a\":".repeat(depth),
                "}".repeat(depth),
                "[".repeat(depth),
                "]".repeat(depth)
            );
            dir.write(&dir.journal(), line);
            let (lock, _) = lock::read(&dir.lock()).expect("a damaged journal reads");
            assert!(lock.stages.is_empty());
        }
    });
}

#[test]
fn deep_values_in_set_are_an_error() {
    on_main_sized_stack(|| {
        for depth in [100, 5_000, 60_000] {
            for arg in [
                format!("a.x={}{}", "[".repeat(depth), "]".repeat(depth)),
                format!("a.x={}1{}", "{a=".repeat(depth), "}".repeat(depth)),
            ] {
                assert!(arg.parse::<Override>().is_err(), "depth {depth}");
            }
        }
    });
}

/// A `--set` key path is as deep as its dots; 30 levels parse and are an error like any
/// unknown key when loaded.
#[test]
fn a_set_key_path_thirty_deep_is_an_error() {
    on_main_sized_stack(|| {
        let keys = vec!["k"; 30].join(".");
        for (base, stage) in [(DIAMOND, "a"), (STUDY, "stats"), (STUDY, "pipeline")] {
            let o: Override = format!("{stage}.{keys}=1").parse().expect("parses");
            assert!(load_bytes(base.as_bytes(), &[o]).is_err());
        }
    });
}

/// `--set STAGE.k.k.k...=1` once built tables as deep as the key path and freeing them
/// recursed once per level: at 60,000 parts (a 120 KB argument, which Linux accepts) the main
/// thread's 8 MiB stack overflowed and the process aborted. The parser now refuses deep paths.
#[test]
fn a_set_key_path_sixty_thousand_deep_is_an_error() {
    on_main_sized_stack(|| {
        let keys = vec!["k"; 60_000].join(".");
        for stage in ["a", "stats", "pipeline"] {
            let parsed = format!("{stage}.{keys}=1").parse::<Override>();
            let msg = parsed.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(msg.contains("at most"), "{msg}");
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Properties

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_pipeline_text_never_panics(text in tomlish()) {
        let _ = load_bytes(text.as_bytes(), &[]);
    }

    #[test]
    fn arbitrary_pipeline_bytes_never_panic(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let _ = load_bytes(&bytes, &[]);
    }

    #[test]
    fn mutated_pipelines_never_panic(base in select(&[STUDY, DIAMOND][..]), edits in edits()) {
        let _ = load_bytes(apply(base, &edits).as_bytes(), &[]);
    }

    #[test]
    fn pipelines_with_bytes_changed_never_panic(
        base in select(&[STUDY, DIAMOND][..]),
        edits in byte_edits(),
    ) {
        let _ = load_bytes(&apply_bytes(base, &edits), &[]);
    }

    #[test]
    fn arbitrary_and_mutated_locks_never_panic(
        text in prop_oneof![
            tomlish(),
            edits().prop_map(|e| apply(DIAMOND_LOCK, &e)),
        ],
        bytes in byte_edits(),
        use_bytes in any::<bool>(),
    ) {
        let dir = Dir::new();
        if use_bytes {
            dir.write(&dir.lock(), apply_bytes(&text, &bytes));
        } else {
            dir.write(&dir.lock(), &text);
        }
        let _ = lock::read(&dir.lock());
    }

    #[test]
    fn journal_lines_never_panic(
        base in prop_oneof![Just(None), Just(Some(DIAMOND_LOCK.to_string())), tomlish().prop_map(Some)],
        lines in prop::collection::vec(journal_line(), 0..6),
        newline_at_end in any::<bool>(),
    ) {
        let dir = Dir::new();
        if let Some(base) = &base {
            dir.write(&dir.lock(), base);
        }
        let mut journal = lines.join("\n");
        if newline_at_end {
            journal.push('\n');
        }
        dir.write(&dir.journal(), journal);
        let _ = lock::read(&dir.lock());
    }

    #[test]
    fn set_on_a_valid_pipeline_never_panics(
        base in select(&[STUDY, DIAMOND][..]),
        overrides in overrides(),
    ) {
        let _ = load_bytes(base.as_bytes(), &overrides);
    }

    #[test]
    fn workspaces_load_and_report_status_without_panicking(
        pipeline in prop_oneof![
            Just(DIAMOND.to_string()),
            edits().prop_map(|e| apply(DIAMOND, &e)),
            edits().prop_map(|e| apply(STUDY, &e)),
        ],
        lock_text in prop_oneof![
            Just(None),
            Just(Some(DIAMOND_LOCK.to_string())),
            edits().prop_map(|e| Some(apply(DIAMOND_LOCK, &e))),
        ],
        journal in prop::collection::vec(journal_line(), 0..4),
        outputs in any::<bool>(),
        overrides in overrides(),
    ) {
        let dir = Dir::new();
        dir.write(&dir.pipeline(), &pipeline);
        if let Some(text) = &lock_text {
            dir.write(&dir.lock(), text);
        }
        if !journal.is_empty() {
            dir.write(&dir.journal(), journal.join("\n"));
        }
        if outputs {
            dir.diamond_outputs();
        }
        let _ = load_and_status(&dir, &overrides);
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 4096,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn set_parser_never_panics(arg in set_arg()) {
        if let Ok(o) = arg.parse::<Override>() {
            prop_assert_eq!(&o.raw, &arg);
            prop_assert!(!o.key_path.is_empty() && !o.table.is_empty());
        }
    }
}

//! The IDX reader and Dataset on real files: fixtures load, malformed input is a clear
//! error (never a panic, fuzzed with proptest), and loading the full training images is
//! fast.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use fmnist_nn::data::{Dataset, IdxArray, Split};
use proptest::prelude::*;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/fashion-mnist")
}

fn gunzip(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap()),
        &mut out,
    )
    .unwrap();
    out
}

/// A small valid images file: 3 images of 28x28.
fn small_images() -> Vec<u8> {
    let bytes = gunzip(&fixture_dir().join("t10k-images-idx3-ubyte.gz"));
    let mut v = vec![0, 0, 8, 3, 0, 0, 0, 3, 0, 0, 0, 28, 0, 0, 0, 28];
    v.extend_from_slice(&bytes[16..16 + 3 * 784]);
    v
}

#[test]
fn fixture_loads_from_gz_and_plain_files_alike() {
    let gz = Dataset::load(&fixture_dir(), Split::Train).unwrap();
    assert_eq!(gz.len(), 1000);
    let dir = tempfile::tempdir().unwrap();
    for name in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"] {
        let bytes = gunzip(&fixture_dir().join(format!("{name}.gz")));
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    let plain = Dataset::load(dir.path(), Split::Train).unwrap();
    assert_eq!(plain.images, gz.images);
    assert_eq!(plain.labels, gz.labels);
    let test = Dataset::load(&fixture_dir(), Split::Test).unwrap();
    assert_eq!(test.len(), 500);
}

#[test]
fn malformed_files_are_errors_naming_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("empty", vec![], "shorter than the 4-byte header"),
        (
            "wrong-type",
            vec![0, 0, 0x0D, 1, 0, 0, 0, 1, 0, 0, 0, 0],
            "not unsigned byte",
        ),
        ("truncated", small_images()[..1000].to_vec(), "truncated"),
        (
            "long",
            [small_images(), vec![1, 2, 3]].concat(),
            "file has 2355",
        ),
        ("header-cut", vec![0, 0, 8, 3, 0, 0], "truncated header"),
        ("bad-gzip", vec![0x1f, 0x8b, 8, 0, 1, 2, 3], "corrupt gzip"),
    ];
    for (name, bytes, expected) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, &bytes).unwrap();
        let e = IdxArray::read(&path).unwrap_err().to_string();
        assert!(e.contains(name) && e.contains(expected), "{name}: {e}");
        let e = IdxArray::parse(&bytes, name);
        if name != "bad-gzip" {
            assert!(e.unwrap_err().to_string().contains(expected));
        }
    }
    let missing = IdxArray::read(&dir.path().join("absent"))
        .unwrap_err()
        .to_string();
    assert!(missing.contains("absent"), "{missing}");
}

#[test]
fn dataset_rejects_mismatched_labels() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("t10k-images-idx3-ubyte"), small_images()).unwrap();
    // Four labels for three images.
    std::fs::write(
        dir.path().join("t10k-labels-idx1-ubyte"),
        [0, 0, 8, 1, 0, 0, 0, 4, 1, 2, 3, 4],
    )
    .unwrap();
    let e = Dataset::load(dir.path(), Split::Test)
        .unwrap_err()
        .to_string();
    assert!(e.contains("labels have shape [4]"), "{e}");
    // A label of 10.
    std::fs::write(
        dir.path().join("t10k-labels-idx1-ubyte"),
        [0, 0, 8, 1, 0, 0, 0, 3, 1, 2, 10],
    )
    .unwrap();
    let e = Dataset::load(dir.path(), Split::Test)
        .unwrap_err()
        .to_string();
    assert!(e.contains("label 10"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = IdxArray::parse(&bytes, "fuzz");
    }

    #[test]
    fn random_headers_never_panic(rank in 0u8..6, dims in proptest::collection::vec(any::<u32>(), 0..6), body in 0usize..64) {
        let mut bytes = vec![0, 0, 8, rank];
        for d in dims { bytes.extend_from_slice(&d.to_be_bytes()); }
        bytes.extend(std::iter::repeat_n(7u8, body));
        if let Ok(a) = IdxArray::parse(&bytes, "fuzz") {
            prop_assert_eq!(a.dims.iter().product::<usize>(), a.data.len());
        }
    }

    #[test]
    fn mutated_valid_files_never_panic(
        edits in proptest::collection::vec((0usize..2400, any::<u8>()), 1..8),
        cut in 0usize..2400,
        to_file in any::<bool>(),
    ) {
        let mut bytes = small_images();
        for (at, v) in edits { let n = bytes.len(); bytes[at % n] = v; }
        bytes.truncate(cut.max(1).min(bytes.len()));
        let parsed = if to_file {
            let mut f = tempfile::NamedTempFile::new().unwrap();
            f.write_all(&bytes).unwrap();
            IdxArray::read(f.path())
        } else {
            IdxArray::parse(&bytes, "fuzz")
        };
        if let Ok(a) = parsed {
            prop_assert_eq!(a.dims.iter().product::<usize>(), a.data.len());
        }
    }

    #[test]
    fn mutated_gzip_never_panics(edits in proptest::collection::vec((0usize..4000, any::<u8>()), 1..6)) {
        let mut bytes = std::fs::read(fixture_dir().join("t10k-labels-idx1-ubyte.gz")).unwrap();
        for (at, v) in edits { let n = bytes.len(); bytes[at % n] = v; }
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&bytes).unwrap();
        let _ = IdxArray::read(f.path());
    }
}

/// The full training images, decompressed once into a temp folder (as the download stage
/// publishes them), load in well under a second. Skipped without the Debian package.
#[test]
fn full_training_images_load_fast() {
    let Some(source) = fmnist_nn::test_support::real_data("full_training_images_load_fast") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for name in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte"] {
        std::fs::write(
            dir.path().join(name),
            gunzip(&source.join(format!("{name}.gz"))),
        )
        .unwrap();
    }
    let started = Instant::now();
    let data = Dataset::load(dir.path(), Split::Train).unwrap();
    let plain = started.elapsed();
    assert_eq!(data.len(), 60_000);
    let started = Instant::now();
    let gz = Dataset::load(&source, Split::Train).unwrap();
    let gzipped = started.elapsed();
    assert_eq!(gz.images, data.images);
    eprintln!("load train split: plain IDX {plain:?}, gzip {gzipped:?}");
    assert!(plain.as_secs_f64() < 1.0, "plain load took {plain:?}");
}

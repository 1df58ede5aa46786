//! Property tests of the IDX parser: whatever the bytes (random, or a valid file with its
//! magic, element type, rank, dimensions or data mutated, plain or gzip-compressed, cut
//! short), every public entry point (`parse`, `parse_owned`, `read` of a plain or gzip file,
//! `Dataset::load`) agrees with an independent model of the format, returns an error for
//! anything malformed, never panics, and never allocates much more than the file holds: a
//! counting allocator records the largest single allocation of the whole test binary.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

use fmnist_nn::data::{Dataset, IdxArray, Split};
use proptest::prelude::*;

/// The largest single allocation (or reallocation) made so far by any thread.
static LARGEST: AtomicUsize = AtomicUsize::new(0);

struct Counting;

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// No file in these tests is larger than a few KiB (compressed), nor holds more than 64 KiB
/// of elements, except the gzip bomb (64 MiB of zeros in 64 KiB): nothing may allocate more
/// than this at once.
const ALLOCATION_LIMIT: usize = 8 << 20;

fn assert_small_allocations() {
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(
        largest < ALLOCATION_LIMIT,
        "an allocation of {largest} bytes (limit {ALLOCATION_LIMIT})"
    );
}

/// The format, independently: Some((dims, elements)) exactly when `bytes` is a well-formed
/// IDX array of unsigned bytes.
fn model(bytes: &[u8]) -> Option<(Vec<usize>, Vec<u8>)> {
    let (&[0, 0, 0x08, rank], rest) = bytes.split_first_chunk::<4>()? else {
        return None;
    };
    let rank = usize::from(rank);
    if rank == 0 || rest.len() < 4 * rank {
        return None;
    }
    let (dim_bytes, data) = rest.split_at(4 * rank);
    let dims: Vec<usize> = dim_bytes
        .chunks(4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .collect();
    let count = dims
        .iter()
        .try_fold(1u128, |acc, &d| acc.checked_mul(d as u128))?;
    (count == data.len() as u128).then(|| (dims, data.to_vec()))
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).expect("writing to a Vec");
    enc.finish().expect("writing to a Vec")
}

fn temp_file(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().expect("creating a temp file");
    f.write_all(bytes).expect("writing a temp file");
    f
}

/// What an entry point returned, comparable with the model.
fn outcome(r: Result<IdxArray, fmnist_nn::data::IdxError>) -> Option<(Vec<usize>, Vec<u8>)> {
    r.ok().map(|a| (a.dims, a.data))
}

/// Checks every entry point against the model on `bytes`, plain and gzip-compressed.
fn check_all_entry_points(bytes: &[u8]) -> Result<(), TestCaseError> {
    let expected = model(bytes);
    prop_assert_eq!(outcome(IdxArray::parse(bytes, "fuzz")), expected.clone());
    prop_assert_eq!(
        outcome(IdxArray::parse_owned(bytes.to_vec(), "fuzz")),
        expected.clone()
    );
    let plain = IdxArray::read(temp_file(bytes).path());
    if bytes.starts_with(&[0x1f, 0x8b]) {
        // Read as gzip whatever the name: random bytes after the magic are corrupt data.
        let _ = plain;
    } else {
        prop_assert_eq!(outcome(plain), expected.clone());
    }
    let compressed = IdxArray::read(temp_file(&gzip(bytes)).path());
    prop_assert_eq!(outcome(compressed), expected);
    assert_small_allocations();
    Ok(())
}

/// A dimension: mostly small, sometimes at or near the limits of u32.
fn dim() -> impl Strategy<Value = u32> {
    prop_oneof![
        4 => 0u32..=6,
        2 => Just(28u32),
        1 => Just(60_000u32),
        1 => Just(u32::MAX),
        1 => Just(1u32 << 31),
        1 => Just(65_536u32),
        1 => any::<u32>(),
    ]
}

/// How the data after the header relates to what the dimensions announce.
#[derive(Debug, Clone)]
enum Body {
    Exact,
    Shorter(usize),
    Longer(usize),
    Len(usize),
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        4 => Just(Body::Exact),
        2 => (1usize..64).prop_map(Body::Shorter),
        2 => (1usize..64).prop_map(Body::Longer),
        1 => (0usize..256).prop_map(Body::Len),
    ]
}

/// An IDX file whose header fields are each usually valid and sometimes not.
fn mutated_file() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![6 => Just([0u8, 0]), 1 => any::<[u8; 2]>(), 1 => Just([0x1f, 0x8b])],
        prop_oneof![6 => Just(0x08u8), 1 => any::<u8>()],
        proptest::collection::vec(dim(), 0..5),
        prop_oneof![8 => Just(None), 1 => any::<u8>().prop_map(Some)],
        body(),
        any::<u8>(),
    )
        .prop_map(|(magic, kind, dims, rank, body, fill)| {
            let rank = rank.unwrap_or(dims.len() as u8);
            let mut bytes = vec![magic[0], magic[1], kind, rank];
            for d in &dims {
                bytes.extend_from_slice(&d.to_be_bytes());
            }
            let announced = dims
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d as usize))
                .filter(|&n| n <= 1 << 16);
            let len = match (body, announced) {
                (Body::Exact, Some(n)) => n,
                (Body::Shorter(k), Some(n)) => n.saturating_sub(k),
                (Body::Longer(k), Some(n)) => n + k,
                (Body::Len(n), _) => n,
                // Too many elements to write: a short body, as a corrupt file would have.
                (_, None) => 17,
            };
            bytes.extend((0..len).map(|i| fill.wrapping_add(i as u8)));
            bytes
        })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 384,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_bytes_are_parsed_as_the_format_says(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        check_all_entry_points(&bytes)?;
    }

    #[test]
    fn arbitrary_bytes_after_a_valid_prefix_never_panic(
        prefix in prop_oneof![Just(vec![0u8, 0, 8]), Just(vec![0u8, 0, 8, 1]), Just(vec![0x1f, 0x8b])],
        rest in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut bytes = prefix;
        bytes.extend(rest);
        check_all_entry_points(&bytes)?;
    }

    #[test]
    fn mutated_headers_are_errors_unless_well_formed(bytes in mutated_file()) {
        check_all_entry_points(&bytes)?;
    }

    #[test]
    fn cut_or_damaged_gzip_is_an_error_not_a_panic(
        bytes in mutated_file(),
        cut in any::<prop::sample::Index>(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
    ) {
        let full = gzip(&bytes);
        let short = &full[..cut.index(full.len())];
        prop_assert!(IdxArray::read(temp_file(short).path()).is_err());
        let mut damaged = full.clone();
        for (at, v) in edits {
            let i = at.index(damaged.len());
            damaged[i] = v;
        }
        let got = outcome(IdxArray::read(temp_file(&damaged).path()));
        if let Some((dims, data)) = got {
            // Only a damage that decodes to a well-formed array (e.g. in the gzip header's
            // mtime) may be accepted, and then the elements must be those the dims announce.
            prop_assert_eq!(dims.iter().product::<usize>(), data.len());
        }
        assert_small_allocations();
    }

    #[test]
    fn dataset_load_rejects_mismatched_or_damaged_files(
        images in mutated_file(),
        labels in mutated_file(),
        compress in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().expect("creating a temp folder");
        let write = |name: &str, bytes: &[u8]| {
            let (name, bytes) = if compress {
                (format!("{name}.gz"), gzip(bytes))
            } else {
                (name.to_string(), bytes.to_vec())
            };
            std::fs::write(dir.path().join(name), bytes).expect("writing a temp file");
        };
        write(&Split::Test.images_file(), &images);
        write(&Split::Test.labels_file(), &labels);
        let well_formed = match (model(&images), model(&labels)) {
            (Some((idims, _)), Some((ldims, ldata))) => {
                idims.len() == 3 && idims[1..] == [28, 28]
                    && ldims == [idims[0]] && ldata.iter().all(|&l| l <= 9)
            }
            _ => false,
        };
        let loaded = Dataset::load(dir.path(), Split::Test);
        prop_assert_eq!(loaded.is_ok(), well_formed);
        assert_small_allocations();
    }
}

/// A header announcing 4 Gi x 4 Gi elements (or 47 million) over a few bytes of data is an
/// error found before any buffer of that size is allocated, plain or compressed.
#[test]
fn huge_dimensions_over_little_data_allocate_nothing_big() {
    let dims: [&[u32]; 4] = [
        &[u32::MAX, u32::MAX],
        &[60_000, 28, 28],
        &[1 << 31],
        &[u32::MAX, u32::MAX, u32::MAX, 2],
    ];
    for d in dims {
        let mut bytes = vec![0, 0, 8, d.len() as u8];
        for x in d {
            bytes.extend_from_slice(&x.to_be_bytes());
        }
        bytes.extend_from_slice(&[1; 100]);
        assert!(IdxArray::parse(&bytes, "huge").is_err());
        assert!(IdxArray::read(temp_file(&bytes).path()).is_err());
        let e = IdxArray::read(temp_file(&gzip(&bytes)).path())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("overflow") || e.contains("truncated"), "{e}");
    }
    assert_small_allocations();
}

/// A gzip bomb: a 1-element header followed by 64 MiB of zeros (64 KiB compressed) is an
/// error that says how long the data really is, without holding it in memory.
#[test]
fn gzip_bomb_is_rejected_without_decompressing_into_memory() {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(&[0, 0, 8, 1, 0, 0, 0, 1])
        .expect("writing to a Vec");
    let zeros = 64u64 << 20;
    std::io::copy(
        &mut std::io::Read::take(std::io::repeat(0), zeros),
        &mut enc,
    )
    .expect("writing to a Vec");
    let bomb = enc.finish().expect("writing to a Vec");
    assert!(bomb.len() < 1 << 20, "{} bytes compressed", bomb.len());
    let e = IdxArray::read(temp_file(&bomb).path())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(e.contains(&format!("file has {zeros}")), "{e}");
    assert_small_allocations();
}

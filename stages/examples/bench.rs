//! Runs `fmnist_stages::bench` from the command line until the CLI wires it up:
//! `cargo run --release -p fmnist-stages --example bench -- baseline|resnet18 IMAGES THREADS [candle] [--json]`.

use fmnist_stages::bench;
use fmnist_stages::models::ModelKind;
use std::path::Path;

#[global_allocator]
static ALLOCATOR: fmnist_stages::ops::HugePageAlloc = fmnist_stages::ops::HugePageAlloc;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = match args.first().map(String::as_str) {
        Some("resnet18") => ModelKind::Resnet18,
        Some("baseline") | None => ModelKind::Baseline,
        Some(other) => anyhow::bail!("unknown model {other:?} (baseline | resnet18)"),
    };
    let images = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(1280);
    let threads = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(2);
    let fast = !args.iter().any(|a| a == "candle");
    let report = bench::run_with(
        model,
        images,
        threads,
        Path::new(bench::DEFAULT_DATA_DIR),
        fast,
    )?;
    if args.iter().any(|a| a == "--json") {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("{report}");
    }
    Ok(())
}

//! fmnist-pipe: the binary. Everything is in the library (`fmnist_pipe::cli` and the engine
//! modules it drives); this file only picks the allocator.

use std::process::ExitCode;

#[global_allocator]
static ALLOCATOR: fmnist_stages::ops::HugePageAlloc = fmnist_stages::ops::HugePageAlloc;

fn main() -> ExitCode {
    fmnist_pipe::cli::main()
}

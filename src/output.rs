//! Standard output for commands that print results: a reader that goes away (`| head`, `| true`)
//! ends the program quietly, as ripgrep does; any other write error (a full disk) is an error
//! with exit 1, never a panic.

use std::io::Write;

use crate::error::PipeError;

/// Writes `text` to standard output and flushes it.
pub fn emit(text: &str) -> Result<(), PipeError> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => Err(PipeError::io("cannot write to standard output", e)),
    }
}

/// [`emit`] with a newline.
pub fn emit_line(text: &str) -> Result<(), PipeError> {
    emit(&format!("{text}\n"))
}

/// A line on standard error; failures to write it are ignored (there is nowhere left to say so).
pub fn warn_line(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

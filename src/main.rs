mod cache;
mod config;
mod dag;
mod error;
mod fingerprint;
mod lock;
mod manifest;
mod progress;
mod registry;
fn main() {}

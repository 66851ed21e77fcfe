//! avatar-warden: keeps third-party avatars alive.
//!
//! The pipeline (see `docs/ARCHITECTURE.md`): scan the profile table → fetch →
//! classify → validate → store → record. Each stage is a module; `pipeline`
//! runs one scan end to end and `schedule` repeats it.

#![warn(unreachable_pub)]
// clippy::pedantic in unit tests (#17 triage): fixtures cast small counts and
// fill literals with `Default::default()`; the library itself is held to all.
#![cfg_attr(
    test,
    allow(
        clippy::cast_possible_truncation,
        clippy::cast_possible_wrap,
        clippy::cast_sign_loss,
        clippy::default_trait_access,
        clippy::trivially_copy_pass_by_ref
    )
)]

pub mod app;
pub(crate) mod check;
pub mod classify;
pub(crate) mod cli;
pub mod config;
pub mod db;
pub mod demo;
pub(crate) mod fetch;
pub mod gc;
pub mod media;
pub(crate) mod metrics;
pub(crate) mod model;
pub(crate) mod pipeline;
pub(crate) mod progress;
pub mod providers;
pub(crate) mod push;
pub(crate) mod report;
pub(crate) mod schedule;
pub(crate) mod secret;
pub(crate) mod serve;
pub mod sinks;
pub mod storage;

/// The command line: parses the arguments, runs the command and returns
/// its exit code (the binary's whole `main`).
pub use cli::main as run_cli;

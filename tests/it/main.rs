//! Integration tests: one binary, so linking happens once.
//! Each test builds the real thing: a fresh SQLite database in a temp dir, the
//! simulated origin on an OS-chosen port, a real object store.

// clippy::pedantic in tests (#17 triage): fixtures cast small counts, fill
// literals with `Default::default()`, and name files by known extensions.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    clippy::default_trait_access,
    clippy::case_sensitive_file_extension_comparisons,
    clippy::needless_pass_by_value
)]

mod architecture;
mod cli;
mod guard;
mod helpers;
mod hostile;
mod monitoring;
mod ops;
mod politeness;
mod proxy;
mod readonly;
mod retries;
mod reverify;
mod rewrite;
mod rules;
mod s3;
mod scan;
mod secrets;
mod sinks;
mod standins;
mod walk;
mod writepath;

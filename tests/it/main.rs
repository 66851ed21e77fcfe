//! Integration tests: one binary, so linking happens once.
//! Each test builds the real thing: a fresh SQLite database in a temp dir, the
//! simulated origin on an OS-chosen port, a real object store.

mod architecture;
mod cli;
mod guard;
mod helpers;
mod hostile;
mod ops;
mod politeness;
mod proxy;
mod retries;
mod reverify;
mod rules;
mod s3;
mod scan;
mod secrets;
mod sinks;
mod standins;
mod writepath;

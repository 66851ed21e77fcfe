//! avatar-warden: keeps third-party avatars alive.
//!
//! The pipeline (see `docs/ARCHITECTURE.md`): scan the profile table → fetch →
//! classify → validate → store → record. Each stage is a module; `pipeline`
//! runs one scan end to end and `schedule` repeats it.

#![warn(unreachable_pub)]

pub mod app;
pub mod check;
pub mod classify;
pub mod cli;
pub mod config;
pub mod db;
pub mod demo;
pub mod fetch;
pub mod gc;
pub mod media;
pub mod metrics;
pub mod model;
pub mod pipeline;
pub mod progress;
pub mod providers;
pub mod push;
pub mod report;
pub mod schedule;
pub mod secret;
pub mod serve;
pub mod sinks;
pub mod storage;

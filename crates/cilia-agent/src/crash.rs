//! Named crash points for testing recovery: with `CILIA_CRASH_AT=<point>`
//! in its environment the agent aborts (as `kill -9` would leave it) when it
//! reaches that point, e.g. `endpoint-create:after-veth`. Unset, a crash
//! point costs one comparison against a string read once.
//!
//! Points (in the order each operation reaches them):
//! * `endpoint-create:after-record`, `:after-veth`, `:after-policy`,
//!   `:after-attach`, `:after-publish`, `:after-ready`
//! * `endpoint-delete:after-unpublish`, `:after-disconnect`, `:after-detach`,
//!   `:after-veth`
//! * `endpoint-labels:after-record`, `:after-attach`

use std::sync::OnceLock;

/// The environment variable naming the crash point.
pub const CRASH_ENV: &str = "CILIA_CRASH_AT";

/// Every crash point, for tests that walk them all.
pub const CRASH_POINTS: &[&str] = &[
    "endpoint-create:after-record",
    "endpoint-create:after-veth",
    "endpoint-create:after-policy",
    "endpoint-create:after-attach",
    "endpoint-create:after-publish",
    "endpoint-create:after-ready",
    "endpoint-delete:after-unpublish",
    "endpoint-delete:after-disconnect",
    "endpoint-delete:after-detach",
    "endpoint-delete:after-veth",
    "endpoint-labels:after-record",
    "endpoint-labels:after-attach",
];

/// Aborts the process if `point` is the configured crash point.
pub fn point(point: &str) {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    let at = AT.get_or_init(|| std::env::var(CRASH_ENV).ok());
    if at.as_deref() == Some(point) {
        eprintln!("{CRASH_ENV}={point}: aborting here, as a crash would");
        std::process::abort();
    }
}

//! Helpers for tests only: compiled for the crate's own unit tests and, with
//! the `testkit` feature, for the integration tests and benches (which turn
//! it on through the crate's dev-dependency on itself). Nothing here is part
//! of the release library.
//!
//! The one rule for prerequisites lives here: a test that needs root or a
//! tool skips loudly (`SKIPPED <test>: <reason>` straight to fd 2, which
//! libtest doesn't capture) when run by hand without it, and fails when `CI`
//! is set to anything but an empty string, `0`, `false` or `no`.

pub mod certs;

use std::fmt::Display;
use std::io::Write;

/// Whether we run under CI, where a missing prerequisite is a failure.
pub fn in_ci() -> bool {
    match std::env::var("CI") {
        Ok(v) => !matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "" | "0" | "false" | "no"
        ),
        Err(_) => false,
    }
}

/// Whether the tests run with effective uid 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Decides whether a test may go on. `ok`: go on. Otherwise, under CI: panic
/// (the test fails); by hand: print `SKIPPED <test>: <reason>` to the real
/// stderr and return `false` (the caller returns, the test "passes").
pub fn prerequisite(test: &str, ok: bool, reason: impl Display) -> bool {
    if ok {
        return true;
    }
    if in_ci() {
        panic!("{test}: prerequisite missing and CI is set, so this fails instead of skipping: {reason}");
    }
    // Straight to fd 2: libtest captures `eprintln!`, and a skip must be seen.
    let _ = writeln!(std::io::stderr().lock(), "SKIPPED {test}: {reason}");
    false
}

/// Whether a root-only test may run (see [`prerequisite`]).
pub fn need_root(test: &str) -> bool {
    prerequisite(test, is_root(), "needs root")
}

//! Bounded waits: every poll has a deadline, and a timeout says what was awaited and the state.

use std::thread;
use std::time::{Duration, Instant};

/// Poll `check` every 50 ms until it holds; after `within`, panic naming `what` with
/// `context()` (the state a reader needs to see why).
pub fn wait_for(
    within: Duration,
    what: &str,
    mut check: impl FnMut() -> bool,
    context: impl Fn() -> String,
) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if check() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "timed out after {within:?} waiting for {what}; state:\n{}",
        context()
    );
}

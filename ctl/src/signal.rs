//! Stopping a release from outside: the first SIGINT/SIGTERM asks the release to stop cleanly
//! (cancel the refresh, put the previous release back); a second one calls `on_second`, which
//! exits at once. [`Stop`] is what the release procedure watches; tests make one by hand.

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// A stop request as the release procedure sees it: the name of the signal, once one came.
#[derive(Debug, Clone)]
pub struct Stop(watch::Receiver<Option<&'static str>>);

/// The sending side, for tests and for [`listen`].
#[derive(Debug)]
pub struct StopHandle(watch::Sender<Option<&'static str>>);

impl StopHandle {
    pub fn stop(&self, why: &'static str) {
        self.0.send_replace(Some(why));
    }
}

impl Stop {
    /// A stop that can be triggered through the handle.
    pub fn new() -> (StopHandle, Stop) {
        let (tx, rx) = watch::channel(None);
        (StopHandle(tx), Stop(rx))
    }

    /// The signal, if one came.
    pub fn requested(&self) -> Option<&'static str> {
        *self.0.borrow()
    }

    /// Wait until a stop is requested; never returns when nobody can request one.
    pub async fn wait(&mut self) -> &'static str {
        loop {
            if let Some(why) = *self.0.borrow_and_update() {
                return why;
            }
            if self.0.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Listen for SIGINT and SIGTERM: the first requests the stop, the second calls `on_second`
/// with the signal's name (meant to print the state and exit). Needs a Tokio runtime.
pub fn listen(on_second: impl Fn(&'static str) + Send + 'static) -> std::io::Result<Stop> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (handle, stop) = Stop::new();
    tokio::spawn(async move {
        let mut seen = 0u32;
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            seen += 1;
            if seen == 1 {
                tracing::warn!(
                    signal = name,
                    "stopping: cancelling the refresh and restoring; a second signal exits at once"
                );
                handle.stop(name);
            } else {
                on_second(name);
            }
        }
    });
    Ok(stop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn wait_returns_the_signal_once_stopped() {
        let (handle, mut stop) = Stop::new();
        assert_eq!(stop.requested(), None);
        let waiter = tokio::spawn(async move { stop.wait().await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!waiter.is_finished());
        handle.stop("SIGTERM");
        assert_eq!(waiter.await.expect("join"), "SIGTERM");
    }
}

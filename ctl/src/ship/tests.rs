//! The release procedure with fakes and paused time: the paths where what matters is what
//! ctl writes (or does not) while Auto Scaling misbehaves, someone else writes, or a signal
//! comes. The same paths against moto and the real binary are in `ctl/tests/`.

use super::*;
use crate::lock::LockRecord;
use crate::refresh::RefreshState;
use fakes::{FOREIGN, Step, World, request};
use tokio::time::{Instant, sleep};

pub(super) mod fakes;
mod gate;

use RefreshState::*;

#[tokio::test(start_paused = true)]
async fn describe_errors_beyond_the_tolerance_write_nothing_back() {
    let w = World::new(vec![vec![Step::State(InProgress), Step::Error]]);
    let (r, _) = w.run(&request()).await;
    let outcome = r.expect("outcome");
    assert_eq!(outcome.exit_code(), ExitCode::NotRolledBack, "{outcome:?}");
    let Outcome::NotRolledBack { reason, advice } = &outcome else {
        panic!("{outcome:?}");
    };
    assert!(
        reason.contains("unknown") && reason.contains("Throttling"),
        "{reason}"
    );
    assert!(advice.contains("nothing was written back"), "{advice}");
    assert!(
        advice.contains("ctl --stack s rollback --to v1"),
        "the command names the previous release: {advice}"
    );
    assert_eq!(w.store.all().len(), 2, "only the release was written");
    assert_eq!(w.store.last().tag.as_str(), "v2");
    assert_eq!((w.refresher.starts(), w.refresher.cancels()), (1, 0));
    assert!(w.unlocked());
}

#[tokio::test(start_paused = true)]
async fn a_foreign_write_during_a_failing_release_is_not_overwritten() {
    let w = World::new(vec![
        vec![Step::State(InProgress), Step::Foreign(Failed)],
        vec![Step::State(Successful)],
    ]);
    let (r, _) = w.run(&request()).await;
    let outcome = r.expect("outcome");
    assert_eq!(outcome.exit_code(), ExitCode::NotRolledBack, "{outcome:?}");
    let Outcome::NotRolledBack { reason, .. } = &outcome else {
        panic!("{outcome:?}");
    };
    assert!(
        reason.contains("someone else changed") && reason.contains("hotfix"),
        "{reason}"
    );
    assert!(reason.contains("written by fake"), "who: {reason}");
    assert_eq!(w.store.all().last().map(String::as_str), Some(FOREIGN));
    assert_eq!(
        w.store.all().len(),
        3,
        "seed, release, foreign: no compensation"
    );
    assert_eq!(w.refresher.starts(), 1, "no rollback refresh");
    assert!(w.unlocked());
}

#[tokio::test(start_paused = true)]
async fn a_foreign_write_during_a_successful_release_is_reported() {
    let w = World::new(vec![vec![
        Step::State(InProgress),
        Step::Foreign(Successful),
    ]]);
    let (r, _) = w.run(&request()).await;
    let outcome = r.expect("outcome");
    assert_eq!(outcome.exit_code(), ExitCode::NotRolledBack, "{outcome:?}");
    assert_eq!(w.store.all().last().map(String::as_str), Some(FOREIGN));
}

#[tokio::test(start_paused = true)]
async fn a_failed_release_is_compensated_and_marked() {
    let w = World::new(vec![
        vec![Step::State(InProgress), Step::State(Failed)],
        vec![Step::State(Successful)],
    ]);
    let (r, _) = w.run(&request()).await;
    assert_eq!(r.expect("outcome").exit_code(), ExitCode::RolledBack);
    let now = w.store.last();
    assert_eq!(now.tag.as_str(), "v1");
    assert_eq!(
        history::compensates(&now),
        Some(2),
        "names the failed version"
    );
    assert!(w.unlocked());
}

#[tokio::test(start_paused = true)]
async fn a_stop_during_the_refresh_cancels_restores_and_starts_the_rollback() {
    let w = World::new(vec![
        vec![Step::State(InProgress)],
        vec![Step::State(Pending)],
    ]);
    let (handle, mut stop) = Stop::new();
    let stopper = async {
        // Well inside the refresh (poll 15 s).
        sleep(Duration::from_secs(100)).await;
        handle.stop("SIGTERM");
        std::future::pending::<()>().await;
    };
    let req = request();
    let (r, events) = tokio::select! {
        r = w.ship(&req, &mut stop) => r,
        () = stopper => unreachable!(),
    };
    let outcome = r.expect("outcome");
    assert_eq!(outcome.exit_code(), ExitCode::RolledBack, "{outcome:?}");
    let Outcome::Interrupted {
        restored,
        refresh_id,
        ..
    } = &outcome
    else {
        panic!("{outcome:?}");
    };
    assert_eq!(refresh_id.as_deref(), Some("r-2"));
    assert!(restored.as_deref().is_some_and(|r| r.starts_with("v1@")));
    assert_eq!(w.refresher.cancels(), 1);
    assert_eq!(w.refresher.starts(), 2);
    assert_eq!(w.store.last().tag.as_str(), "v1");
    assert!(events.iter().any(|e| matches!(e, Event::Stopping { .. })));
    assert!(w.unlocked());
}

#[tokio::test(start_paused = true)]
async fn a_stop_before_the_write_changes_nothing() {
    let w = World::new(vec![vec![Step::State(Successful)]]);
    let (handle, mut stop) = Stop::new();
    handle.stop("SIGINT");
    let (r, _) = w.ship(&request(), &mut stop).await;
    let err = r.expect_err("interrupted");
    assert_eq!(err.exit_code(), ExitCode::Refused, "{err}");
    assert_eq!(w.store.all().len(), 1);
    assert_eq!(w.refresher.starts(), 0);
    assert!(w.unlocked());
}

#[tokio::test(start_paused = true)]
async fn a_held_lock_refuses_and_a_stale_one_says_unlock() {
    let now = OffsetDateTime::now_utc();
    let live = LockRecord::new("other@h/9", "v9", now, Duration::from_secs(600)).to_value();
    let stale = LockRecord::new(
        "other@h/9",
        "v9",
        now - Duration::from_secs(7200),
        Duration::from_secs(600),
    )
    .to_value();
    for (value, needle) in [(live, "holds the lock"), (stale, "ctl --stack s unlock")] {
        let w = World::new(vec![vec![Step::State(Successful)]]);
        *w.lock.value.lock().expect("lock") = Some(value.clone());
        let (r, _) = w.run(&request()).await;
        let err = r.expect_err("busy");
        assert_eq!(err.exit_code(), ExitCode::Busy, "{err}");
        assert!(err.to_string().contains(needle), "{err}");
        assert!(err.to_string().contains("other@h/9"), "{err}");
        assert_eq!(w.store.all().len(), 1, "nothing written");
        assert_eq!(
            w.lock.value.lock().expect("lock").as_deref(),
            Some(value.as_str()),
            "their lock is left alone"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn wait_lock_polls_until_the_lock_is_free_and_no_longer() {
    let held = LockRecord::new(
        "other@h/9",
        "v9",
        OffsetDateTime::now_utc(),
        Duration::from_secs(600),
    )
    .to_value();
    // Freed after 3 reads (3 polls of 5 s): a 60 s wait gets it.
    let w = World::new(vec![vec![Step::State(Successful)]]);
    *w.lock.value.lock().expect("lock") = Some(held.clone());
    *w.lock.frees_after.lock().expect("lock") = Some(3);
    let mut req = request();
    req.wait_lock = Duration::from_secs(60);
    let started = Instant::now();
    let (r, events) = w.run(&req).await;
    assert_eq!(r.expect("released").exit_code(), ExitCode::Success);
    assert!(events.iter().any(|e| matches!(e, Event::Waiting { .. })));
    assert!(
        started.elapsed() >= Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    // Never freed: gives up at the wait.
    let w = World::new(vec![vec![Step::State(Successful)]]);
    *w.lock.value.lock().expect("lock") = Some(held);
    let started = Instant::now();
    let (r, _) = w.run(&req).await;
    assert_eq!(r.expect_err("busy").exit_code(), ExitCode::Busy);
    assert_eq!(started.elapsed(), Duration::from_secs(60));
    assert_eq!(w.store.all().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_running_refresh_lets_the_lock_go_and_refuses() {
    let mut w = World::new(vec![vec![Step::State(Successful)]]);
    w.refresher.latest = Some(InProgress);
    let (r, _) = w.run(&request()).await;
    assert_eq!(r.expect_err("busy").exit_code(), ExitCode::Busy);
    assert!(w.unlocked());
    assert_eq!(w.store.all().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn rollback_after_a_compensated_release_goes_to_the_good_one() {
    let w = World::new(vec![
        vec![Step::State(Failed)],
        vec![Step::State(Successful)],
    ]);
    // v0 then v1 (the seed) were good; v2 fails and is compensated back to v1.
    w.store
        .values
        .lock()
        .expect("lock")
        .insert(0, r#"{"tag":"v0"}"#.into());
    let (r, _) = w.run(&request()).await;
    assert_eq!(r.expect("outcome").exit_code(), ExitCode::RolledBack);
    let mut w2 = World::new(vec![vec![Step::State(Successful)]]);
    w2.store = w.store.clone();
    w2.refresher.store = w.store.clone();
    let mut req = request();
    req.target = Target::Rollback { to: None };
    let (r, _) = w2.run(&req).await;
    assert_eq!(r.expect("outcome").exit_code(), ExitCode::Success);
    let now = w2.store.last();
    assert_eq!(now.tag.as_str(), "v0", "not v2, which was rolled back");
    assert_eq!(now.meta_str("kind"), Some("rollback"));
}

#[tokio::test(start_paused = true)]
async fn a_release_failed_by_an_alarm_rolls_back_watching_no_alarm() {
    // The release refresh fails (as Auto Scaling fails it when a watched alarm goes to ALARM);
    // the rollback refresh must not watch that alarm, which is still in ALARM.
    let w = World::new(vec![
        vec![Step::State(InProgress), Step::State(Failed)],
        vec![Step::State(Successful)],
    ]);
    let mut req = request();
    req.plan.alarms = vec!["app-5xx".into(), "app-hosts".into()];
    let (r, events) = w.run(&req).await;
    let outcome = r.expect("outcome");
    assert_eq!(outcome.exit_code(), ExitCode::RolledBack, "{outcome:?}");
    assert_eq!(
        *w.refresher.alarms.lock().expect("lock"),
        vec![vec!["app-5xx".to_owned(), "app-hosts".to_owned()], vec![]],
        "release watches the alarms, rollback none"
    );
    let started: Vec<(Purpose, Vec<String>)> = events
        .iter()
        .filter_map(|e| match e {
            Event::RefreshStarted {
                purpose, alarms, ..
            } => Some((*purpose, alarms.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(
        started,
        vec![
            (Purpose::Release, vec!["app-5xx".into(), "app-hosts".into()]),
            (Purpose::Rollback, vec![])
        ],
        "the progress output names what each refresh watches"
    );
    assert_eq!(w.store.last().tag.as_str(), "v1");
    assert!(w.unlocked());
}

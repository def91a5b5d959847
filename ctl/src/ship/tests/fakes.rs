//! The fakes of the release procedure's seams (parameter, refresher, lock, registry) and a
//! [`World`] that ships through them: shared by the refresh tests (`ship/tests.rs`) and the
//! in-place rollout's (`ship/rollout/tests.rs`).

use std::sync::{Arc, Mutex};

use super::super::*;
use crate::refresh::{RefreshInfo, RefreshState};
use crate::store::Stored;
use skiff_release::Digest;

pub(crate) const V1: &str = r#"{"tag":"v1","digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111"}"#;
pub(crate) const FOREIGN: &str = r#"{"tag":"hotfix","released_by":"someone"}"#;

/// The parameter's versions, oldest first (version = index + 1).
#[derive(Default)]
pub(crate) struct FakeStore {
    pub(crate) values: Mutex<Vec<String>>,
}

impl FakeStore {
    pub(crate) fn seeded(v: &str) -> Arc<FakeStore> {
        Arc::new(FakeStore {
            values: Mutex::new(vec![v.to_owned()]),
        })
    }
    pub(crate) fn put(&self, v: &str) -> i64 {
        let mut vs = self.values.lock().expect("lock");
        vs.push(v.to_owned());
        i64::try_from(vs.len()).expect("len")
    }
    pub(crate) fn all(&self) -> Vec<String> {
        self.values.lock().expect("lock").clone()
    }
    pub(crate) fn last(&self) -> Release {
        Release::parse(self.all().last().expect("a value")).expect("a release")
    }
}

fn stored(version: usize, value: &str) -> Stored {
    Stored {
        version: i64::try_from(version).expect("version"),
        value: value.to_owned(),
        release: Release::parse(value).ok(),
        modified_at: None,
        modified_by: Some("fake".into()),
    }
}

impl ReleaseStore for Arc<FakeStore> {
    async fn read(&self) -> Result<Option<Stored>, StoreError> {
        let vs = self.all();
        Ok(vs.last().map(|v| stored(vs.len(), v)))
    }
    async fn write(&self, release: &Release) -> Result<i64, StoreError> {
        Ok(self.put(&release.to_value()))
    }
    async fn history(&self, limit: usize) -> Result<Vec<Stored>, StoreError> {
        let vs = self.all();
        Ok(vs
            .iter()
            .enumerate()
            .rev()
            .take(limit)
            .map(|(i, v)| stored(i + 1, v))
            .collect())
    }
}

/// One answer to DescribeInstanceRefreshes.
#[derive(Clone, Copy)]
pub(crate) enum Step {
    State(RefreshState),
    Error,
    /// Someone else writes FOREIGN to the parameter, then the refresh is in this state.
    Foreign(RefreshState),
}

/// Refreshes `r-1`, `r-2`, ... each answering its script in turn (the last repeats).
pub(crate) struct FakeRefresher {
    pub(crate) store: Arc<FakeStore>,
    pub(crate) latest: Option<RefreshState>,
    scripts: Mutex<Vec<Vec<Step>>>,
    after_cancel: Mutex<Option<Vec<Step>>>,
    starts: Mutex<u32>,
    cancels: Mutex<u32>,
    /// The alarms of each refresh started, in order.
    pub(crate) alarms: Mutex<Vec<Vec<String>>>,
}

impl FakeRefresher {
    pub(crate) fn new(store: &Arc<FakeStore>, scripts: Vec<Vec<Step>>) -> Self {
        FakeRefresher {
            store: store.clone(),
            latest: None,
            scripts: Mutex::new(scripts),
            after_cancel: Mutex::new(None),
            starts: Mutex::new(0),
            cancels: Mutex::new(0),
            alarms: Mutex::new(Vec::new()),
        }
    }
    pub(crate) fn starts(&self) -> u32 {
        *self.starts.lock().expect("lock")
    }
    pub(crate) fn cancels(&self) -> u32 {
        *self.cancels.lock().expect("lock")
    }
}

fn next(list: &mut Vec<Step>) -> Step {
    if list.len() > 1 {
        list.remove(0)
    } else {
        list[0]
    }
}

impl InstanceRefresher for FakeRefresher {
    async fn latest(&self) -> Result<Option<RefreshInfo>, RefreshError> {
        Ok(self.latest.map(|state| info("r-0", state)))
    }
    async fn start(&self, plan: &RefreshPlan) -> Result<String, RefreshError> {
        self.alarms.lock().expect("lock").push(plan.alarms.clone());
        let mut n = self.starts.lock().expect("lock");
        *n += 1;
        *self.after_cancel.lock().expect("lock") = None;
        Ok(format!("r-{n}"))
    }
    async fn describe(&self, id: &str) -> Result<RefreshInfo, RefreshError> {
        let step = match self.after_cancel.lock().expect("lock").as_mut() {
            Some(list) => next(list),
            None => {
                let n: usize = id[2..].parse().expect("id");
                next(&mut self.scripts.lock().expect("lock")[n - 1])
            }
        };
        match step {
            Step::State(s) => Ok(info(id, s)),
            Step::Foreign(s) => {
                self.store.put(FOREIGN);
                Ok(info(id, s))
            }
            Step::Error => Err(RefreshError::Describe {
                asg: "g".into(),
                detail: "Throttling: Rate exceeded".into(),
            }),
        }
    }
    async fn activities(
        &self,
        _since: std::time::SystemTime,
    ) -> Result<Vec<crate::refresh::Activity>, RefreshError> {
        Ok(Vec::new())
    }
    async fn cancel(&self) -> Result<(), RefreshError> {
        *self.cancels.lock().expect("lock") += 1;
        *self.after_cancel.lock().expect("lock") = Some(vec![
            Step::State(RefreshState::Cancelling),
            Step::State(RefreshState::Cancelled),
        ]);
        Ok(())
    }
}

fn info(id: &str, state: RefreshState) -> RefreshInfo {
    RefreshInfo {
        id: id.into(),
        state,
        percent: None,
        reason: None,
        instances_to_update: None,
    }
}

/// A lock whose value can be set from outside; `frees_after` reads, a held lock goes away.
#[derive(Default)]
pub(crate) struct FakeLock {
    pub(crate) value: Mutex<Option<String>>,
    pub(crate) frees_after: Mutex<Option<u32>>,
}

impl ReleaseLock for FakeLock {
    fn name(&self) -> &str {
        "/p-lock"
    }
    async fn create(&self, value: &str) -> Result<bool, LockError> {
        let mut v = self.value.lock().expect("lock");
        if v.is_some() {
            return Ok(false);
        }
        *v = Some(value.to_owned());
        Ok(true)
    }
    async fn read(&self) -> Result<Option<String>, LockError> {
        let mut frees = self.frees_after.lock().expect("lock");
        if let Some(n) = frees.as_mut() {
            if *n == 0 {
                *frees = None;
                *self.value.lock().expect("lock") = None;
            } else {
                *n -= 1;
            }
        }
        Ok(self.value.lock().expect("lock").clone())
    }
    async fn delete(&self) -> Result<(), LockError> {
        *self.value.lock().expect("lock") = None;
        Ok(())
    }
}

pub(crate) struct FakeResolver;

impl DigestResolver for FakeResolver {
    async fn resolve(&self, _repository: &str, _tag: &Tag) -> Result<Digest, RegistryError> {
        Ok(
            "sha256:2222222222222222222222222222222222222222222222222222222222222222"
                .parse()
                .expect("digest"),
        )
    }
}

pub(crate) fn request() -> Request {
    Request {
        target: Target::Tag {
            tag: "v2".parse().expect("tag"),
            verify: true,
        },
        released_by: "tester".into(),
        owner: "tester@host/1".into(),
        dry_run: false,
        wait: true,
        rollback: true,
        timeout: Duration::from_secs(1800),
        poll: Duration::from_secs(15),
        wait_lock: Duration::ZERO,
        plan: RefreshPlan::default(),
        rollout: None,
        ctl: "ctl --stack s".into(),
    }
}

pub(crate) struct World {
    pub(crate) store: Arc<FakeStore>,
    pub(crate) refresher: FakeRefresher,
    pub(crate) lock: FakeLock,
}

impl World {
    pub(crate) fn new(scripts: Vec<Vec<Step>>) -> World {
        let store = FakeStore::seeded(V1);
        World {
            refresher: FakeRefresher::new(&store, scripts),
            store,
            lock: FakeLock::default(),
        }
    }

    pub(crate) async fn ship(
        &self,
        req: &Request,
        stop: &mut Stop,
    ) -> (Result<Outcome, ShipError>, Vec<Event>) {
        self.ship_with(&NoInPlace, req, stop).await
    }

    /// [`ship_with`]: released in place on `hosts` when `req.rollout` says so.
    pub(crate) async fn ship_with<H: InPlaceFleet>(
        &self,
        hosts: &H,
        req: &Request,
        stop: &mut Stop,
    ) -> (Result<Outcome, ShipError>, Vec<Event>) {
        let mut events = Vec::new();
        let r = ship_with(&self.fleet(), hosts, req, stop, &mut |e| events.push(e)).await;
        (r, events)
    }

    /// What a release acts on: these fakes, the image `reg.example/app`.
    pub(crate) fn fleet(
        &self,
    ) -> Adapters<'_, Arc<FakeStore>, FakeRefresher, FakeResolver, FakeLock> {
        Adapters {
            parameter: "/p",
            image: "reg.example/app",
            store: &self.store,
            refresher: &self.refresher,
            resolver: &FakeResolver,
            lock: &self.lock,
        }
    }

    pub(crate) async fn run(&self, req: &Request) -> (Result<Outcome, ShipError>, Vec<Event>) {
        let (_handle, mut stop) = Stop::new();
        self.ship(req, &mut stop).await
    }

    pub(crate) fn unlocked(&self) -> bool {
        self.lock.value.lock().expect("lock").is_none()
    }
}

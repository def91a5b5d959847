//! The agent's own log lines to CloudWatch Logs: with `[logs]`, every line the agent writes to
//! stderr (and so to journald under systemd) is also copied into a bounded in-memory queue, and
//! a background task sends the queue every few seconds with `PutLogEvents` to the app's group,
//! stream `<instance>/~agent`.
//!
//! Why in the agent: the CloudWatch agent cannot read journald, and Fluent Bit is not packaged
//! for Debian 12; the agent already holds the group, region, endpoint and credentials.
//!
//! Why `~agent`: a release tag is `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`, so no tag contains `~`
//! and the agent's stream can never be taken for a release's; CloudWatch stream names forbid
//! only `:` and `*`.
//! https://docs.aws.amazon.com/AmazonCloudWatchLogs/latest/APIReference/API_CreateLogStream.html
//!
//! Sending never blocks or slows the agent: a line is copied under a short lock, the queue
//! drops its oldest lines beyond [`QUEUE_BYTES`] and counts them, and the sender's failures
//! (denied, unknown group, endpoint down) are written once per kind straight to stderr (never
//! through `tracing`, so they cannot feed the queue) and retried on the agent's [`Backoff`].

use std::collections::{HashSet, VecDeque};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_cloudwatchlogs::Client;
use aws_sdk_cloudwatchlogs::types::InputLogEvent;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::AwsLogs;

/// The agent's stream name after `<instance>/`: not a release tag (see the module doc).
pub const AGENT_MARKER: &str = skiff_release::log_stream::AGENT;

/// Memory the queue may hold (message bytes); older lines beyond it are dropped.
pub const QUEUE_BYTES: usize = 1024 * 1024;

/// How often the queue is sent.
pub const SEND_EVERY: Duration = Duration::from_secs(5);

// Limits of one PutLogEvents call.
// https://docs.aws.amazon.com/AmazonCloudWatchLogs/latest/APIReference/API_PutLogEvents.html
/// At most 10,000 events per batch.
pub const MAX_BATCH_EVENTS: usize = 10_000;
/// At most 1,048,576 bytes per batch, counted as the UTF-8 message plus 26 bytes per event.
pub const MAX_BATCH_BYTES: usize = 1_048_576;
pub const EVENT_OVERHEAD: usize = 26;
/// A batch may not span more than 24 hours.
pub const MAX_BATCH_SPAN_MS: i64 = 24 * 3600 * 1000;
/// Events older than 14 days are refused.
pub const MAX_AGE_MS: i64 = 14 * 24 * 3600 * 1000;
/// The largest event, 256 KiB with its overhead; longer lines are cut.
pub const MAX_EVENT_BYTES: usize = 256 * 1024 - EVENT_OVERHEAD;

/// The agent's stream in the group.
pub fn stream_name(instance: &str) -> String {
    crate::logging::stream_name(instance, AGENT_MARKER)
}

/// One captured line: milliseconds since the epoch, and the line without its newline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    pub timestamp: i64,
    pub message: String,
}

impl Line {
    fn cost(&self) -> usize {
        self.message.len() + EVENT_OVERHEAD
    }
}

/// What [`plan`] makes of the queued lines: batches to send in order, and lines too old to send.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub batches: Vec<Vec<Line>>,
    pub too_old: usize,
}

/// Lines -> batches within PutLogEvents' limits: chronological (stable for equal times), at
/// most [`MAX_BATCH_EVENTS`] and [`MAX_BATCH_BYTES`] each, none spanning more than 24 hours,
/// and nothing older than 14 days before `now_ms`.
pub fn plan(mut lines: Vec<Line>, now_ms: i64) -> Plan {
    let before = lines.len();
    lines.retain(|l| now_ms - l.timestamp <= MAX_AGE_MS);
    let too_old = before - lines.len();
    lines.sort_by_key(|l| l.timestamp);
    let mut batches: Vec<Vec<Line>> = Vec::new();
    let mut bytes = 0;
    for line in lines {
        let fits = batches.last().is_some_and(|b| {
            b.len() < MAX_BATCH_EVENTS
                && bytes + line.cost() <= MAX_BATCH_BYTES
                && line.timestamp - b[0].timestamp <= MAX_BATCH_SPAN_MS
        });
        if !fits {
            batches.push(Vec::new());
            bytes = 0;
        }
        bytes += line.cost();
        batches.last_mut().expect("pushed above").push(line);
    }
    Plan { batches, too_old }
}

/// Cut a line to [`MAX_EVENT_BYTES`] on a character boundary.
fn cut(mut s: String) -> String {
    if s.len() > MAX_EVENT_BYTES {
        let mut end = MAX_EVENT_BYTES;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// The bounded queue between the log writer and the sender.
#[derive(Debug, Default)]
pub struct Queue {
    lines: VecDeque<Line>,
    bytes: usize,
    dropped: u64,
    limit: usize,
}

impl Queue {
    pub fn new(limit: usize) -> Self {
        Queue {
            limit,
            ..Queue::default()
        }
    }

    /// Add a line at the back, dropping the oldest while over the limit.
    pub fn push(&mut self, line: Line) {
        self.bytes += line.message.len();
        self.lines.push_back(line);
        self.trim();
    }

    /// Put unsent lines back at the front (they are older than anything queued since).
    pub fn requeue(&mut self, lines: Vec<Line>) {
        for line in lines.into_iter().rev() {
            self.bytes += line.message.len();
            self.lines.push_front(line);
        }
        self.trim();
    }

    fn trim(&mut self) {
        while self.bytes > self.limit {
            match self.lines.pop_front() {
                Some(l) => {
                    self.bytes -= l.message.len();
                    self.dropped += 1;
                }
                None => break,
            }
        }
    }

    pub fn take(&mut self) -> Vec<Line> {
        self.bytes = 0;
        self.lines.drain(..).collect()
    }

    pub fn len(&self) -> usize {
        self.lines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Lines dropped since the last call.
    pub fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }
}

pub type SharedQueue = Arc<Mutex<Queue>>;

pub fn shared_queue() -> SharedQueue {
    Arc::new(Mutex::new(Queue::new(QUEUE_BYTES)))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A `MakeWriter` for the log formatter: each event goes to stderr as before and, unless its
/// target is the SDK the sender itself calls through, into the queue.
#[derive(Debug, Clone)]
pub struct Tee {
    queue: Option<SharedQueue>,
}

impl Tee {
    /// `None`: stderr only (no `[logs]`).
    pub fn new(queue: Option<SharedQueue>) -> Self {
        Tee { queue }
    }
}

/// The writer of one event: writes through to stderr, keeps a copy until dropped.
#[derive(Debug)]
pub struct TeeWriter {
    queue: Option<SharedQueue>,
    copy: Vec<u8>,
}

impl Write for TeeWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.queue.is_some() {
            self.copy.extend_from_slice(buf);
        }
        std::io::stderr().write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl Drop for TeeWriter {
    fn drop(&mut self) {
        let Some(queue) = &self.queue else { return };
        if self.copy.is_empty() {
            return;
        }
        let text = String::from_utf8_lossy(&self.copy);
        let timestamp = now_ms();
        // A poisoned lock (a panic while pushing) loses the copy, never the stderr line.
        if let Ok(mut q) = queue.lock() {
            for l in text.lines().filter(|l| !l.is_empty()) {
                q.push(Line {
                    timestamp,
                    message: cut(l.to_owned()),
                });
            }
        }
    }
}

/// Events of the SDK and HTTP stack the sender uses are not sent: sending them would make
/// each send produce the next one's lines.
fn sent(target: &str) -> bool {
    ![
        "aws_smithy",
        "aws_sdk_cloudwatchlogs",
        "aws_config",
        "hyper",
        "h2",
        "rustls",
    ]
    .iter()
    .any(|p| target.starts_with(p))
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Tee {
    type Writer = TeeWriter;

    fn make_writer(&'a self) -> TeeWriter {
        TeeWriter {
            queue: self.queue.clone(),
            copy: Vec::new(),
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> TeeWriter {
        TeeWriter {
            queue: self.queue.clone().filter(|_| sent(meta.target())),
            copy: Vec::new(),
        }
    }
}

/// Why a send failed, as reported (once per kind) to the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FailureKind {
    Denied,
    NoGroup,
    Unreachable,
    Other,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(
        "not allowed to write stream {stream} in log group {group} ({detail}); the instance role needs logs:CreateLogStream and logs:PutLogEvents on the group's streams (templates/app.yaml grants them)"
    )]
    Denied {
        group: String,
        stream: String,
        detail: String,
    },
    #[error(
        "log group {group} does not exist ({detail}); create it (the stack does) or fix logs.group"
    )]
    NoGroup { group: String, detail: String },
    #[error(
        "cannot reach CloudWatch Logs for group {group}: {detail} (check logs.endpoint, logs.region and the network)"
    )]
    Unreachable { group: String, detail: String },
    #[error("cannot write the agent's logs to group {group}: {detail}")]
    Other { group: String, detail: String },
}

impl SendError {
    pub fn kind(&self) -> FailureKind {
        match self {
            SendError::Denied { .. } => FailureKind::Denied,
            SendError::NoGroup { .. } => FailureKind::NoGroup,
            SendError::Unreachable { .. } => FailureKind::Unreachable,
            SendError::Other { .. } => FailureKind::Other,
        }
    }
}

/// The sender: creates the stream once, then sends the queue every [`SEND_EVERY`].
#[derive(Debug)]
pub struct Sender {
    client: Client,
    group: String,
    stream: String,
    queue: SharedQueue,
    created: bool,
    backoff: Backoff,
    reported: HashSet<FailureKind>,
}

impl Sender {
    pub fn new(client: Client, aws: &AwsLogs, queue: SharedQueue) -> Self {
        Sender {
            client,
            group: aws.group.clone(),
            stream: stream_name(&aws.instance),
            queue,
            created: false,
            backoff: Backoff::new(SEND_EVERY, Duration::from_secs(300)),
            reported: HashSet::new(),
        }
    }

    /// A client for the group's region and endpoint, from the agent's one SDK configuration
    /// (sharing its HTTP client and credentials: a second one would cost idle memory).
    pub fn client(sdk: &aws_config::SdkConfig, aws: &AwsLogs) -> Client {
        let mut b = aws_sdk_cloudwatchlogs::config::Builder::from(sdk);
        if let Some(r) = &aws.region {
            b = b.region(aws_config::Region::new(r.clone()));
        }
        if let Some(e) = &aws.endpoint {
            b = b.endpoint_url(e);
        }
        Client::from_conf(b.build())
    }

    /// Send until cancelled, then one last bounded send of what is left.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(SEND_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tick.tick() => {}
            }
            if !self.backoff.is_waiting() {
                self.send_once().await;
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(3), self.send_once()).await;
    }

    async fn send_once(&mut self) {
        let (lines, dropped) = {
            let Ok(mut q) = self.queue.lock() else { return };
            (q.take(), q.take_dropped())
        };
        if dropped > 0 {
            eprintln!(
                "agent: cloudlog: {dropped} agent log lines dropped (more than {QUEUE_BYTES} bytes queued while CloudWatch Logs was away or slow)"
            );
        }
        if lines.is_empty() {
            return;
        }
        let plan = plan(lines, now_ms());
        if plan.too_old > 0 {
            eprintln!(
                "agent: cloudlog: {} agent log lines older than 14 days not sent",
                plan.too_old
            );
        }
        let mut batches = plan.batches.into_iter();
        while let Some(batch) = batches.next() {
            if let Err(e) = self.send(&batch).await {
                let kind = e.kind();
                if self.reported.insert(kind) {
                    eprintln!("agent: cloudlog: {e}; retrying with backoff");
                }
                self.backoff.fail();
                let mut unsent = batch;
                unsent.extend(batches.flatten());
                if let Ok(mut q) = self.queue.lock() {
                    q.requeue(unsent);
                }
                return;
            }
        }
        if !self.reported.is_empty() {
            eprintln!("agent: cloudlog: writing to {} again", self.stream);
            self.reported.clear();
        }
        self.backoff.reset();
    }

    async fn send(&mut self, batch: &[Line]) -> Result<(), SendError> {
        if !self.created {
            match self
                .client
                .create_log_stream()
                .log_group_name(&self.group)
                .log_stream_name(&self.stream)
                .send()
                .await
            {
                Ok(_) => {}
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|s| s.is_resource_already_exists_exception()) => {}
                Err(e) => {
                    let no_group = e
                        .as_service_error()
                        .is_some_and(|s| s.is_resource_not_found_exception());
                    return Err(self.error(&e, no_group));
                }
            }
            self.created = true;
        }
        let events = batch
            .iter()
            .map(|l| {
                InputLogEvent::builder()
                    .timestamp(l.timestamp)
                    .message(&l.message)
                    .build()
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| SendError::Other {
                group: self.group.clone(),
                detail: e.to_string(),
            })?;
        // No sequence token: PutLogEvents accepts concurrent puts to one stream since 2023.
        // https://docs.aws.amazon.com/AmazonCloudWatchLogs/latest/APIReference/API_PutLogEvents.html
        match self
            .client
            .put_log_events()
            .log_group_name(&self.group)
            .log_stream_name(&self.stream)
            .set_log_events(Some(events))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                let not_found = e
                    .as_service_error()
                    .is_some_and(|s| s.is_resource_not_found_exception());
                if not_found {
                    // The stream (or its group) went away: create it again next time.
                    self.created = false;
                }
                Err(self.error(&e, not_found))
            }
        }
    }

    fn error<E, R>(
        &self,
        e: &aws_sdk_cloudwatchlogs::error::SdkError<E, R>,
        no_group: bool,
    ) -> SendError
    where
        E: aws_sdk_cloudwatchlogs::error::ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug,
    {
        use aws_sdk_cloudwatchlogs::error::SdkError;
        let group = self.group.clone();
        let detail = match e {
            SdkError::ServiceError(s) => {
                let err = s.err();
                format!(
                    "{}: {}",
                    err.code().unwrap_or("error"),
                    err.message().unwrap_or("")
                )
            }
            other => aws_sdk_cloudwatchlogs::error::DisplayErrorContext(other).to_string(),
        };
        if no_group {
            return SendError::NoGroup { group, detail };
        }
        match e {
            SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => {
                SendError::Unreachable { group, detail }
            }
            SdkError::ServiceError(s)
                if s.err().code().is_some_and(skiff_release::access::is_denied) =>
            {
                SendError::Denied {
                    group,
                    stream: self.stream.clone(),
                    detail,
                }
            }
            _ => SendError::Other { group, detail },
        }
    }
}

#[cfg(test)]
mod tests;

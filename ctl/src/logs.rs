//! `ctl logs`: the app's output across the fleet, from the CloudWatch Logs group the agents'
//! Docker `awslogs` driver writes to. Each host writes one stream per release, named
//! `<instance>/<tag>` (the agent's `logging::stream_name`), so every line can say where it came
//! from and which release printed it.
//!
//! The decisions (stream names, selection, order, formatting, the follow cursor) are pure; the
//! `LogSource` seam is what reads CloudWatch.

use std::collections::HashSet;
use std::time::Duration;

use aws_sdk_cloudwatchlogs::Client;

use crate::aws;

/// Output key of the skiff stack template naming the app's log group.
pub const OUTPUT_LOG_GROUP: &str = "LogGroup";

/// FilterLogEvents takes at most 100 stream names.
/// https://docs.aws.amazon.com/AmazonCloudWatchLogs/latest/APIReference/API_FilterLogEvents.html
pub const MAX_STREAMS: usize = 100;

/// The release shown for an agent's own stream `<instance>/~agent` (the contract's
/// `log_stream::AGENT`; no release tag can contain `~`).
pub const AGENT_RELEASE: &str = skiff_release::log_stream::AGENT;

/// Lines read in one go before ctl stops and says to narrow the window.
pub const MAX_EVENTS: usize = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum LogsError {
    #[error(
        "log group {group} does not exist ({detail}); check --stack/--log-group and --region (the stack output {OUTPUT_LOG_GROUP} names it)"
    )]
    NoGroup { group: String, detail: String },
    #[error(
        "not allowed to read log group {group} ({detail}); the caller needs logs:FilterLogEvents and logs:DescribeLogStreams on it: attach the stack's DeployerPolicyArn"
    )]
    Denied { group: String, detail: String },
    #[error(
        "cannot read log group {group}: {detail} (check AWS_ENDPOINT_URL, the network and your credentials)"
    )]
    Read { group: String, detail: String },
    #[error(
        "{count} log streams match; CloudWatch reads at most {MAX_STREAMS} at once: narrow with --instance or --release"
    )]
    TooManyStreams { count: usize },
    #[error(
        "more than {MAX_EVENTS} lines since the start of the window; use a shorter --since, --instance or --release"
    )]
    TooManyEvents,
    #[error(
        "no log group known: pass --stack (its output {OUTPUT_LOG_GROUP}) or --log-group; the stack writes logs only when its template has the log group"
    )]
    NoLogGroup,
}

/// One event of the group, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub stream: String,
    /// Milliseconds since the epoch, as the app's line was timestamped by the driver.
    pub timestamp: i64,
    pub id: String,
    pub message: String,
}

/// A stream name split into the instance and the release that wrote it. Streams not written
/// by a skiff agent (no `/`) keep their whole name as the instance and `-` as the release.
/// The agent's own lines are in `<instance>/~agent` (the agent's `cloudlog::AGENT_MARKER`, never
/// a release tag): their release reads `~agent`, they are shown by default, and
/// `--release '~agent'` selects them alone.
pub fn parse_stream(name: &str) -> (&str, &str) {
    skiff_release::log_stream::split(name).unwrap_or((name, "-"))
}

/// The streams to read, or `None` for the whole group (no filter given).
pub fn select_streams(
    names: &[String],
    instance: Option<&str>,
    release: Option<&str>,
) -> Option<Vec<String>> {
    if instance.is_none() && release.is_none() {
        return None;
    }
    Some(
        names
            .iter()
            .filter(|n| {
                let (i, r) = parse_stream(n);
                instance.is_none_or(|want| want == i) && release.is_none_or(|want| want == r)
            })
            .cloned()
            .collect(),
    )
}

/// Interleave by time: the order in which the lines were printed across hosts (ties broken by
/// stream, then by CloudWatch's event id, which grows within a stream).
pub fn interleave(events: &mut [Event]) {
    events.sort_by(|a, b| (a.timestamp, &a.stream, &a.id).cmp(&(b.timestamp, &b.stream, &b.id)));
}

/// Where `--follow` asks from next, and which events at that millisecond were printed already
/// (CloudWatch's start time is inclusive, and lines with the same timestamp can arrive late).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub start: i64,
    /// (stream, event id): ids are unique within a stream only (moto numbers them per stream).
    seen: HashSet<(String, String)>,
}

impl Cursor {
    pub fn new(start: i64) -> Self {
        Cursor {
            start,
            seen: HashSet::new(),
        }
    }

    /// Keep the events not printed yet (in order) and move the cursor past them. Events older
    /// than the cursor's millisecond cannot come back from a query starting there.
    pub fn advance(&mut self, events: Vec<Event>) -> Vec<Event> {
        let fresh: Vec<Event> = events
            .into_iter()
            .filter(|e| {
                e.timestamp >= self.start && !self.seen.contains(&(e.stream.clone(), e.id.clone()))
            })
            .collect();
        if let Some(last) = fresh.iter().map(|e| e.timestamp).max()
            && last > self.start
        {
            self.start = last;
            self.seen.clear();
        }
        self.seen.extend(
            fresh
                .iter()
                .filter(|e| e.timestamp == self.start)
                .map(|e| (e.stream.clone(), e.id.clone())),
        );
        fresh
    }
}

/// One printed line: `time instance release message`, or a JSON object with `--json`.
pub fn format_line(e: &Event, json: bool) -> String {
    let (instance, release) = parse_stream(&e.stream);
    let time = format_time(e.timestamp);
    let message = e.message.trim_end_matches(['\n', '\r']);
    if json {
        serde_json::json!({
            "time": time,
            "instance": instance,
            "release": release,
            "message": message,
            "stream": e.stream,
        })
        .to_string()
    } else {
        format!("{time} {instance} {release} {message}")
    }
}

fn format_time(ms: i64) -> String {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| ms.to_string())
}

/// The milliseconds-since-epoch `since` before `now_ms`.
pub fn window_start(now_ms: i64, since: Duration) -> i64 {
    now_ms.saturating_sub(i64::try_from(since.as_millis()).unwrap_or(i64::MAX))
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// What reads the group: CloudWatch Logs, or a test's stand-in.
pub trait LogSource {
    /// The names of the group's streams starting with `prefix`.
    fn stream_names(
        &self,
        prefix: Option<&str>,
    ) -> impl Future<Output = Result<Vec<String>, LogsError>> + Send;
    /// Every event from `start` (ms, inclusive) on, in `streams` or the whole group.
    fn events(
        &self,
        start: i64,
        streams: Option<&[String]>,
    ) -> impl Future<Output = Result<Vec<Event>, LogsError>> + Send;
}

/// The filters of one `ctl logs`.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub instance: Option<String>,
    pub release: Option<String>,
}

/// The events from `start` on, filtered and interleaved.
pub async fn read<S: LogSource>(
    source: &S,
    filter: &Filter,
    start: i64,
) -> Result<Vec<Event>, LogsError> {
    let streams = if filter.instance.is_some() || filter.release.is_some() {
        let prefix = filter.instance.as_ref().map(|i| format!("{i}/"));
        let names = source.stream_names(prefix.as_deref()).await?;
        let selected = select_streams(
            &names,
            filter.instance.as_deref(),
            filter.release.as_deref(),
        )
        .unwrap_or_default();
        if selected.is_empty() {
            return Ok(Vec::new());
        }
        if selected.len() > MAX_STREAMS {
            return Err(LogsError::TooManyStreams {
                count: selected.len(),
            });
        }
        Some(selected)
    } else {
        None
    };
    let mut events = source.events(start, streams.as_deref()).await?;
    interleave(&mut events);
    Ok(events)
}

/// CloudWatch Logs.
#[derive(Debug, Clone)]
pub struct CloudWatchLogs {
    client: Client,
    group: String,
}

impl CloudWatchLogs {
    pub fn new(client: Client, group: &str) -> Self {
        CloudWatchLogs {
            client,
            group: group.to_owned(),
        }
    }

    fn error<E>(&self, e: &E) -> LogsError
    where
        E: aws_smithy_types::error::metadata::ProvideErrorMetadata + std::error::Error,
    {
        let group = self.group.clone();
        let detail = aws::describe(e);
        match aws::code(e).as_deref() {
            Some("ResourceNotFoundException") => LogsError::NoGroup { group, detail },
            Some(c) if skiff_release::access::is_denied(c) => LogsError::Denied { group, detail },
            _ => LogsError::Read { group, detail },
        }
    }
}

impl LogSource for CloudWatchLogs {
    async fn stream_names(&self, prefix: Option<&str>) -> Result<Vec<String>, LogsError> {
        let mut names = Vec::new();
        let mut token = None;
        loop {
            let out = self
                .client
                .describe_log_streams()
                .log_group_name(&self.group)
                .set_log_stream_name_prefix(prefix.map(str::to_owned))
                .set_next_token(token)
                .send()
                .await
                .map_err(|e| self.error(&e))?;
            names.extend(
                out.log_streams
                    .unwrap_or_default()
                    .into_iter()
                    .filter_map(|s| s.log_stream_name),
            );
            token = out.next_token;
            // A group with more streams than one `ctl logs` may read is refused by the caller.
            if token.is_none() || names.len() > MAX_STREAMS * 10 {
                return Ok(names);
            }
        }
    }

    async fn events(
        &self,
        start: i64,
        streams: Option<&[String]>,
    ) -> Result<Vec<Event>, LogsError> {
        let mut events = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let out = self
                .client
                .filter_log_events()
                .log_group_name(&self.group)
                .start_time(start)
                .set_log_stream_names(streams.map(<[String]>::to_vec))
                .set_next_token(token.clone())
                .send()
                .await
                .map_err(|e| self.error(&e))?;
            events.extend(out.events.unwrap_or_default().into_iter().filter_map(|e| {
                Some(Event {
                    stream: e.log_stream_name?,
                    timestamp: e.timestamp?,
                    id: e.event_id.unwrap_or_default(),
                    message: e.message.unwrap_or_default(),
                })
            }));
            if events.len() > MAX_EVENTS {
                return Err(LogsError::TooManyEvents);
            }
            // A token equal to the one sent means the end (the API may repeat it).
            match out.next_token {
                Some(t) if Some(&t) != token.as_ref() => token = Some(t),
                _ => return Ok(events),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(stream: &str, timestamp: i64, id: &str) -> Event {
        Event {
            stream: stream.into(),
            timestamp,
            id: id.into(),
            message: format!("line {id}\n"),
        }
    }

    #[test]
    fn stream_names_split() {
        let cases = [
            ("i-0abc/3f2c1ab", ("i-0abc", "3f2c1ab")),
            ("i-0abc/~agent", ("i-0abc", "~agent")),
            ("host-1/v1.2_rc", ("host-1", "v1.2_rc")),
            ("skiff-agent", ("skiff-agent", "-")),
            ("/x", ("/x", "-")),
            ("x/", ("x/", "-")),
        ];
        for (name, want) in cases {
            assert_eq!(parse_stream(name), want, "{name}");
        }
    }

    #[test]
    fn selection() {
        let names: Vec<String> = ["i-1/a", "i-1/b", "i-2/a", "i-10/a", "other", "i-1/~agent"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
        /// --instance, --release, the streams read (None: the whole group).
        type Case<'a> = (Option<&'a str>, Option<&'a str>, Option<&'a [&'a str]>);
        let cases: &[Case<'_>] = &[
            (None, None, None),
            (Some("i-1"), None, Some(&["i-1/a", "i-1/b", "i-1/~agent"])),
            (None, Some("~agent"), Some(&["i-1/~agent"])),
            (None, Some("a"), Some(&["i-1/a", "i-2/a", "i-10/a"])),
            (Some("i-1"), Some("b"), Some(&["i-1/b"])),
            (Some("i-3"), None, Some(&[])),
        ];
        for (instance, release, want) in cases {
            let got = select_streams(&names, *instance, *release);
            let want = want.map(|w| w.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>());
            assert_eq!(got, want, "{instance:?} {release:?}");
        }
    }

    #[test]
    fn interleaved_by_time_then_stream() {
        let mut events = vec![
            ev("i-2/a", 30, "3"),
            ev("i-1/a", 10, "1"),
            ev("i-2/a", 10, "2"),
            ev("i-1/a", 20, "4"),
        ];
        interleave(&mut events);
        let order: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(order, ["1", "2", "4", "3"]);
    }

    #[test]
    fn follow_cursor_prints_each_event_once() {
        let mut c = Cursor::new(100);
        let first = c.advance(vec![
            ev("s", 90, "old"),
            ev("s", 100, "a"),
            ev("s", 150, "b"),
        ]);
        assert_eq!(
            first.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(c.start, 150);
        // The next query starts at 150 inclusive: "b" comes back, a late "c" at 150 is new.
        let second = c.advance(vec![ev("s", 150, "b"), ev("s", 150, "c")]);
        assert_eq!(
            second.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
            ["c"]
        );
        let third = c.advance(vec![
            ev("s", 150, "b"),
            ev("s", 150, "c"),
            ev("s", 151, "d"),
        ]);
        assert_eq!(
            third.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
            ["d"]
        );
        assert!(c.advance(vec![ev("s", 151, "d")]).is_empty());
        // The same id in another stream is another event.
        assert_eq!(c.advance(vec![ev("t", 151, "d")]).len(), 1);
    }

    #[test]
    fn lines() {
        let e = ev("i-0abc/3f2c1ab", 1_764_355_630_123, "1");
        assert_eq!(
            format_line(&e, false),
            "2025-11-28T18:47:10.123Z i-0abc 3f2c1ab line 1"
        );
        let j: serde_json::Value = serde_json::from_str(&format_line(&e, true)).expect("json");
        assert_eq!(j["instance"], "i-0abc");
        assert_eq!(j["release"], "3f2c1ab");
        assert_eq!(j["message"], "line 1");
        assert_eq!(j["time"], "2025-11-28T18:47:10.123Z");
        assert_eq!(window_start(600_000, Duration::from_secs(60)), 540_000);
    }
}

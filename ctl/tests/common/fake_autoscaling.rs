//! A scripted Auto Scaling endpoint for the real `ctl` binary, kept only for what the emulator
//! (testbed/emulator, whose instance refreshes the lock, rollback and first SIGTERM tests use)
//! cannot be made to do on cue: a cancel that stays Cancelling, an API outage after N answers,
//! and an abandoned launch reported in the scaling activities while the refresh still says
//! InProgress (see `signals.rs`). `aws-smithy-mocks` reaches only clients built inside the test
//! process, so the binary is pointed here with `AWS_ENDPOINT_URL_AUTO_SCALING` while SSM and EC2
//! stay on the emulator. It speaks just enough of the Auto Scaling query protocol (form body
//! in, XML out) for DescribeInstanceRefreshes, StartInstanceRefresh, CancelInstanceRefresh,
//! DescribeScalingActivities and DescribeAutoScalingGroups, one request per connection. Like
//! Auto Scaling, it runs one refresh at a time: StartInstanceRefresh fails with
//! InstanceRefreshInProgress while the newest refresh is active.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// What the fake answers.
#[derive(Debug, Default, Clone)]
pub struct Script {
    /// State of the group's newest refresh before ctl starts one (`None`: never refreshed).
    pub before: Option<&'static str>,
    /// For each refresh ctl starts, in turn (ids `r-1`, `r-2`, ...), the states answered to
    /// DescribeInstanceRefreshes; the last one repeats.
    pub refreshes: Vec<Vec<&'static str>>,
    /// Instances of the group: (id, zone).
    pub instances: Vec<(&'static str, &'static str)>,
    /// States answered once a cancel was requested (the last repeats); empty: `Cancelled`.
    pub after_cancel: Vec<&'static str>,
    /// After this many DescribeInstanceRefreshes of a given refresh id, every further one fails
    /// (an outage of the API, with an error code the SDK does not retry).
    pub describe_fails_after: Option<usize>,
    /// Scaling activities (status code, description, cause), started "now", answered once a
    /// refresh was started and described twice; none before.
    pub activities: Vec<(&'static str, &'static str, &'static str)>,
}

/// What the fake was asked.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    /// Every action, in order.
    pub actions: Vec<String>,
    /// The form parameters of each StartInstanceRefresh.
    pub starts: Vec<HashMap<String, String>>,
}

impl Seen {
    pub fn count(&self, action: &str) -> usize {
        self.actions.iter().filter(|a| *a == action).count()
    }
}

#[derive(Default)]
struct State {
    script: Script,
    seen: Seen,
    cancelled: bool,
    describes_by_id: usize,
}

pub struct FakeAutoScaling {
    pub url: String,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeAutoScaling {
    pub fn start(script: Script) -> FakeAutoScaling {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake auto scaling");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(Mutex::new(State {
            script,
            ..State::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, stp) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stp.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    serve(conn, &st);
                }
            }
        });
        FakeAutoScaling {
            url,
            state,
            stop,
            thread: Some(thread),
        }
    }

    pub fn seen(&self) -> Seen {
        self.state.lock().expect("lock").seen.clone()
    }
}

impl Drop for FakeAutoScaling {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(self.url.trim_start_matches("http://"));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(conn: TcpStream, state: &Mutex<State>) {
    let mut reader = BufReader::new(match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut length = 0usize;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let form = parse_form(&String::from_utf8_lossy(&body));
    let (status, xml) = answer(&form, &mut state.lock().expect("lock"));
    let mut conn = conn;
    let _ = write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: text/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xml}",
        xml.len()
    );
    let _ = conn.flush();
}

fn parse_form(body: &str) -> HashMap<String, String> {
    body.split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (super::form_decode(k), super::form_decode(v)))
        .collect()
}

fn refresh_xml(id: &str, state: &str) -> String {
    let percent = if state == "Successful" { 100 } else { 40 };
    format!(
        "<member><InstanceRefreshId>{id}</InstanceRefreshId><AutoScalingGroupName>g</AutoScalingGroupName>\
         <Status>{state}</Status><StatusReason>{state} (fake)</StatusReason>\
         <PercentageComplete>{percent}</PercentageComplete></member>"
    )
}

fn wrap(action: &str, result: &str) -> String {
    format!(
        "<{action}Response xmlns=\"http://autoscaling.amazonaws.com/doc/2011-01-01/\">\
         <{action}Result>{result}</{action}Result>\
         <ResponseMetadata><RequestId>fake</RequestId></ResponseMetadata></{action}Response>"
    )
}

/// The state of started refresh number `n` (1-based); `advance` consumes one scripted step.
fn refresh_state(s: &mut State, n: usize, advance: bool) -> Option<&'static str> {
    if s.cancelled {
        let list = &mut s.script.after_cancel;
        return Some(match list.len() {
            0 => "Cancelled",
            1 => list[0],
            _ if advance => list.remove(0),
            _ => list[0],
        });
    }
    let list = s.script.refreshes.get_mut(n - 1)?;
    match list.len() {
        0 => None,
        1 => Some(list[0]),
        _ if advance => Some(list.remove(0)),
        _ => Some(list[0]),
    }
}

fn answer(form: &HashMap<String, String>, s: &mut State) -> (&'static str, String) {
    let action = form.get("Action").cloned().unwrap_or_default();
    s.seen.actions.push(action.clone());
    let started = s.seen.starts.len();
    match action.as_str() {
        "DescribeInstanceRefreshes" => {
            if form.contains_key("InstanceRefreshIds.member.1") {
                s.describes_by_id += 1;
                if s.script
                    .describe_fails_after
                    .is_some_and(|n| s.describes_by_id > n)
                {
                    return (
                        "400 Bad Request",
                        "<ErrorResponse><Error><Type>Sender</Type><Code>ScriptedOutage</Code>\
                         <Message>the fake is out of service</Message></Error>\
                         <RequestId>fake</RequestId></ErrorResponse>"
                            .into(),
                    );
                }
            }
            let member = match form.get("InstanceRefreshIds.member.1") {
                Some(id) => {
                    let n = id
                        .strip_prefix("r-")
                        .and_then(|n| n.parse::<usize>().ok())
                        .filter(|n| (1..=started).contains(n));
                    n.and_then(|n| refresh_state(s, n, true))
                        .map(|st| refresh_xml(id, st))
                }
                None if started > 0 => refresh_state(s, started, false)
                    .map(|st| refresh_xml(&format!("r-{started}"), st)),
                None => s.script.before.map(|st| refresh_xml("r-0", st)),
            };
            let result = format!(
                "<InstanceRefreshes>{}</InstanceRefreshes>",
                member.unwrap_or_default()
            );
            ("200 OK", wrap(&action, &result))
        }
        "StartInstanceRefresh" => {
            let active = started > 0
                && matches!(
                    refresh_state(s, started, false),
                    Some("Pending" | "InProgress" | "Cancelling" | "Baking" | "RollbackInProgress")
                );
            if active {
                // https://docs.aws.amazon.com/autoscaling/ec2/APIReference/API_StartInstanceRefresh.html
                // (Errors: InstanceRefreshInProgress)
                return (
                    "400 Bad Request",
                    "<ErrorResponse><Error><Type>Sender</Type><Code>InstanceRefreshInProgress</Code>\
                     <Message>An Instance Refresh is already in progress and blocks the execution of this Instance Refresh.</Message></Error>\
                     <RequestId>fake</RequestId></ErrorResponse>"
                        .into(),
                );
            }
            s.seen.starts.push(form.clone());
            s.cancelled = false;
            let id = format!("r-{}", started + 1);
            (
                "200 OK",
                wrap(
                    &action,
                    &format!("<InstanceRefreshId>{id}</InstanceRefreshId>"),
                ),
            )
        }
        "CancelInstanceRefresh" => {
            s.cancelled = true;
            (
                "200 OK",
                wrap(
                    &action,
                    &format!("<InstanceRefreshId>r-{started}</InstanceRefreshId>"),
                ),
            )
        }
        "DescribeScalingActivities" => {
            let now = time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            let members: String = if started > 0 && s.describes_by_id >= 2 {
                s.script
                    .activities
                    .iter()
                    .enumerate()
                    .map(|(i, (status, description, cause))| {
                        format!(
                            "<member><ActivityId>act-{i}</ActivityId><AutoScalingGroupName>g</AutoScalingGroupName>\
                             <Description>{description}</Description><Cause>{cause}</Cause>\
                             <StartTime>{now}</StartTime><StatusCode>{status}</StatusCode>\
                             <Progress>100</Progress></member>"
                        )
                    })
                    .collect()
            } else {
                String::new()
            };
            (
                "200 OK",
                wrap(&action, &format!("<Activities>{members}</Activities>")),
            )
        }
        "DescribeAutoScalingGroups" => {
            let name = form
                .get("AutoScalingGroupNames.member.1")
                .cloned()
                .unwrap_or_default();
            let instances: String = s
                .script
                .instances
                .iter()
                .map(|(id, zone)| {
                    format!(
                        "<member><InstanceId>{id}</InstanceId><AvailabilityZone>{zone}</AvailabilityZone>\
                         <LifecycleState>InService</LifecycleState><HealthStatus>Healthy</HealthStatus>\
                         <ProtectedFromScaleIn>false</ProtectedFromScaleIn></member>"
                    )
                })
                .collect();
            let group = format!(
                "<AutoScalingGroups><member><AutoScalingGroupName>{name}</AutoScalingGroupName>\
                 <MinSize>0</MinSize><MaxSize>4</MaxSize><DesiredCapacity>{}</DesiredCapacity>\
                 <DefaultCooldown>300</DefaultCooldown><HealthCheckType>EC2</HealthCheckType>\
                 <AvailabilityZones><member>us-east-1a</member></AvailabilityZones>\
                 <CreatedTime>2024-01-01T00:00:00Z</CreatedTime>\
                 <Instances>{instances}</Instances></member></AutoScalingGroups>",
                s.script.instances.len()
            );
            ("200 OK", wrap(&action, &group))
        }
        other => (
            "400 Bad Request",
            format!(
                "<ErrorResponse><Error><Type>Sender</Type><Code>InvalidAction</Code>\
                 <Message>the fake does not implement {other}</Message></Error>\
                 <RequestId>fake</RequestId></ErrorResponse>"
            ),
        ),
    }
}

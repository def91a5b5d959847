//! A small IMDSv2 stand-in on loopback: answers the token PUT and GETs only with that token;
//! serves the instance id, the region, the target lifecycle state and the instance tags, as
//! EC2 does with instance tags enabled in the metadata (404 for an absent tag:
//! <https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/work-with-tags-in-IMDS.html>). The tags
//! come from a map the test holds, or live from an EC2 endpoint (moto) for the instance, so
//! what the agent writes with CreateTags and what a test writes as ctl would are what it reads.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TAGS: &str = "/latest/meta-data/tags/instance";
const TOKEN: &str = "tok-123";

/// Where the instance tags come from.
#[derive(Debug, Clone)]
pub enum Tags {
    /// A map the test holds (see [`Imds::tags`]).
    Held,
    /// EC2 (moto) at this endpoint, read at each request.
    Ec2(String),
}

/// A running stand-in. Dropping it does not stop it (it lives as long as its runtime).
#[derive(Debug, Clone)]
pub struct Imds {
    pub url: String,
    /// The request lines seen, in order.
    pub seen: Arc<Mutex<Vec<String>>>,
    /// `/latest/meta-data/autoscaling/target-lifecycle-state`.
    pub lifecycle: Arc<Mutex<String>>,
    /// The instance tags for [`Tags::Held`].
    pub tags: Arc<Mutex<BTreeMap<String, String>>>,
    /// While set, every instance tag path answers 500 (the metadata service in trouble).
    pub tags_broken: Arc<AtomicBool>,
}

struct World {
    instance_id: String,
    ec2: Option<aws_sdk_ec2::Client>,
    imds: Imds,
}

impl Imds {
    /// Serve on the current tokio runtime. `group`, when given, is the
    /// `aws:autoscaling:groupName` tag (over whatever `tags` says).
    pub async fn serve(instance_id: &str, group: Option<&str>, tags: Tags) -> Imds {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let imds = Imds {
            url: format!("http://{}", listener.local_addr().expect("addr")),
            seen: Arc::default(),
            lifecycle: Arc::new(Mutex::new("InService".into())),
            tags: Arc::default(),
            tags_broken: Arc::default(),
        };
        if let Some(g) = group {
            imds.set_tag("aws:autoscaling:groupName", g);
        }
        let ec2 = match tags {
            Tags::Held => None,
            Tags::Ec2(endpoint) => Some(aws_sdk_ec2::Client::new(
                &crate::emulator::sdk_at(&endpoint).await,
            )),
        };
        let world = Arc::new(World {
            instance_id: instance_id.to_owned(),
            ec2,
            imds: imds.clone(),
        });
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                tokio::spawn(answer(sock, world.clone()));
            }
        });
        imds
    }

    /// Serve on a thread of its own, for tests that have no runtime (the real agent binary).
    pub fn on_thread(instance_id: &str, group: Option<&str>, tags: Tags) -> Imds {
        let (tx, rx) = std::sync::mpsc::channel();
        let (id, group) = (instance_id.to_owned(), group.map(str::to_owned));
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let imds = Imds::serve(&id, group.as_deref(), tags).await;
                tx.send(imds).expect("send");
                std::future::pending::<()>().await
            });
        });
        rx.recv().expect("imds started")
    }

    pub fn set_tag(&self, key: &str, value: &str) {
        self.tags
            .lock()
            .expect("lock")
            .insert(key.to_owned(), value.to_owned());
    }

    pub fn remove_tag(&self, key: &str) {
        self.tags.lock().expect("lock").remove(key);
    }

    /// The request lines seen for `path`.
    pub fn requests_for(&self, path: &str) -> usize {
        self.seen
            .lock()
            .expect("lock")
            .iter()
            .filter(|l| l.split_whitespace().nth(1) == Some(path))
            .count()
    }

    /// An SDK IMDS client for this stand-in.
    pub fn client(&self) -> aws_config::imds::Client {
        aws_config::imds::Client::builder()
            .endpoint(&self.url)
            .expect("endpoint")
            .build()
    }
}

impl World {
    /// The instance's tags: the held map, or EC2's (plus a held group name).
    async fn tags(&self) -> Result<BTreeMap<String, String>, String> {
        let mut tags = self.imds.tags.lock().expect("lock").clone();
        let Some(ec2) = &self.ec2 else {
            return Ok(tags);
        };
        let out = ec2
            .describe_tags()
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name("resource-id")
                    .values(&self.instance_id)
                    .build(),
            )
            .send()
            .await
            .map_err(|e| format!("{e:?}"))?;
        for t in out.tags() {
            if let (Some(k), Some(v)) = (t.key(), t.value()) {
                tags.entry(k.to_owned()).or_insert_with(|| v.to_owned());
            }
        }
        Ok(tags)
    }

    async fn get(&self, path: &str) -> (&'static str, String) {
        match path {
            "/latest/meta-data/instance-id" => ("200 OK", self.instance_id.clone()),
            "/latest/meta-data/placement/region" => ("200 OK", "us-east-1".to_owned()),
            "/latest/meta-data/autoscaling/target-lifecycle-state" => {
                ("200 OK", self.imds.lifecycle.lock().expect("lock").clone())
            }
            p if p == TAGS || p.starts_with(&format!("{TAGS}/")) => {
                if self.imds.tags_broken.load(Ordering::SeqCst) {
                    return ("500 Internal Server Error", String::new());
                }
                let tags = match self.tags().await {
                    Ok(t) => t,
                    Err(e) => return ("500 Internal Server Error", e),
                };
                match p.strip_prefix(&format!("{TAGS}/")) {
                    None => (
                        "200 OK",
                        tags.keys().cloned().collect::<Vec<_>>().join("\n"),
                    ),
                    Some(key) => match tags.get(key) {
                        Some(v) => ("200 OK", v.clone()),
                        None => ("404 Not Found", String::new()),
                    },
                }
            }
            _ => ("404 Not Found", String::new()),
        }
    }
}

async fn answer(mut sock: tokio::net::TcpStream, world: Arc<World>) {
    let mut buf = vec![0u8; 8192];
    let mut n = 0;
    while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
        match sock.read(&mut buf[n..]).await {
            Ok(0) | Err(_) => return,
            Ok(k) => n += k,
        }
    }
    let req = String::from_utf8_lossy(&buf[..n]).to_string();
    let line = req.lines().next().unwrap_or_default().to_owned();
    world.imds.seen.lock().expect("lock").push(line.clone());
    let has_token = req
        .lines()
        .any(|l| l.eq_ignore_ascii_case(&format!("x-aws-ec2-metadata-token: {TOKEN}")));
    let (status, body) = match line.split_whitespace().take(2).collect::<Vec<_>>()[..] {
        ["PUT", "/latest/api/token"] => ("200 OK", TOKEN.to_owned()),
        ["GET", _] if !has_token => ("401 Unauthorized", String::new()),
        ["GET", path] => world.get(path).await,
        _ => ("404 Not Found", String::new()),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nx-aws-ec2-metadata-token-ttl-seconds: 21600\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = sock.write_all(resp.as_bytes()).await;
    let _ = sock.shutdown().await;
}

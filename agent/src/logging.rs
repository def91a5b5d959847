//! Where the app container's output goes: Docker's logging driver and its options, decided from
//! the config and the release (a pure decision; `docker.rs` hands it to the engine).

use std::collections::HashMap;

use crate::config::LogRotation;

/// The container's `HostConfig.LogConfig`: driver name and options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub driver: String,
    pub options: HashMap<String, String>,
}

/// The stream a host writes a release's output to: `<instance>/<tag>`, so that `ctl logs` can
/// name both on each line and filter by either. Neither part contains `/` (config and tag grammar).
pub fn stream_name(instance: &str, tag: &str) -> String {
    skiff_release::log_stream::name(instance, tag)
}

/// The log configuration of a container running release `tag`.
pub fn log_config(logs: &LogRotation, tag: &str) -> LogConfig {
    let rotation = [
        ("max-size", logs.max_size.clone()),
        ("max-file", logs.max_files.to_string()),
    ];
    let Some(aws) = &logs.cloudwatch else {
        // Rotated on the host: https://docs.docker.com/engine/logging/drivers/local/
        return LogConfig {
            driver: logs.driver.as_str().to_owned(),
            options: rotation
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        };
    };
    // https://docs.docker.com/engine/logging/drivers/awslogs/
    let mut options: HashMap<String, String> = [
        ("awslogs-group", aws.group.clone()),
        ("awslogs-stream", stream_name(&aws.instance, tag)),
        // The stack creates the group with its retention and key; the role may not create one.
        ("awslogs-create-group", "false".to_owned()),
        // Blocking mode would stop the app's writes (and a container's start, while the stream
        // is created) whenever CloudWatch is slow or away; non-blocking drops lines beyond the
        // buffer instead. https://docs.docker.com/engine/logging/configure/#configure-the-delivery-mode-of-log-messages-from-container-to-log-driver
        ("mode", "non-blocking".to_owned()),
        ("max-buffer-size", aws.buffer.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    if let Some(region) = &aws.region {
        options.insert("awslogs-region".into(), region.clone());
    }
    if let Some(endpoint) = &aws.endpoint {
        options.insert("awslogs-endpoint".into(), endpoint.clone());
    }
    // Dual logging keeps `docker logs` working from a local cache, bounded like the files
    // above. https://docs.docker.com/engine/logging/dual-logging/
    for (k, v) in rotation {
        options.insert(format!("cache-{k}"), v);
    }
    LogConfig {
        driver: "awslogs".into(),
        options,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AwsLogs, LogDriver};

    fn aws(region: Option<&str>, endpoint: Option<&str>) -> AwsLogs {
        AwsLogs {
            group: "/skiff/prod/app".into(),
            region: region.map(Into::into),
            endpoint: endpoint.map(Into::into),
            instance: "i-0abc".into(),
            buffer: "4m".into(),
        }
    }

    #[test]
    fn driver_and_options() {
        let rotation = |cloudwatch| LogRotation {
            driver: LogDriver::JsonFile,
            max_size: "10m".into(),
            max_files: 3,
            cloudwatch,
        };
        /// Config, driver, options.
        type Case<'a> = (LogRotation, &'a str, &'a [(&'a str, &'a str)]);
        let cases: &[Case<'_>] = &[
            (
                rotation(None),
                "json-file",
                &[("max-size", "10m"), ("max-file", "3")],
            ),
            (
                LogRotation::default(),
                "local",
                &[("max-size", "20m"), ("max-file", "5")],
            ),
            (
                rotation(Some(aws(Some("eu-west-1"), None))),
                "awslogs",
                &[
                    ("awslogs-group", "/skiff/prod/app"),
                    ("awslogs-stream", "i-0abc/3f2c1ab"),
                    ("awslogs-create-group", "false"),
                    ("awslogs-region", "eu-west-1"),
                    ("mode", "non-blocking"),
                    ("max-buffer-size", "4m"),
                    ("cache-max-size", "10m"),
                    ("cache-max-file", "3"),
                ],
            ),
            (
                rotation(Some(aws(None, Some("http://127.0.0.1:5055")))),
                "awslogs",
                &[
                    ("awslogs-group", "/skiff/prod/app"),
                    ("awslogs-stream", "i-0abc/3f2c1ab"),
                    ("awslogs-create-group", "false"),
                    ("awslogs-endpoint", "http://127.0.0.1:5055"),
                    ("mode", "non-blocking"),
                    ("max-buffer-size", "4m"),
                    ("cache-max-size", "10m"),
                    ("cache-max-file", "3"),
                ],
            ),
        ];
        for (logs, driver, options) in cases {
            let got = log_config(logs, "3f2c1ab");
            let want: HashMap<String, String> = options
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            assert_eq!(got.driver, *driver, "{logs:?}");
            assert_eq!(got.options, want, "{logs:?}");
        }
    }
}

//! The key-by-key reader of one table of the config file.

use std::time::Duration;

use serde::de::DeserializeOwned;
use toml::{Table, Value};

/// One table of the file being read: takes its keys one by one, records a problem for each bad
/// value, and at the end one for each key nobody asked for.
pub(super) struct Section<'a> {
    name: &'static str,
    table: Table,
    problems: &'a mut Vec<String>,
    failed: bool,
}

impl<'a> Section<'a> {
    pub(super) fn new(name: &'static str, table: Table, problems: &'a mut Vec<String>) -> Self {
        Section {
            name,
            table,
            problems,
            failed: false,
        }
    }

    pub(super) fn root(table: Table, problems: &'a mut Vec<String>) -> Self {
        Section::new("", table, problems)
    }

    pub(super) fn key(&self, key: &str) -> String {
        if self.name.is_empty() {
            key.to_owned()
        } else {
            format!("{}.{key}", self.name)
        }
    }

    pub(super) fn problem(&mut self, p: String) {
        self.failed = true;
        self.problems.push(p);
    }

    pub(super) fn take<T: DeserializeOwned>(&mut self, key: &str, required: bool) -> Option<T> {
        match self.table.remove(key) {
            None => {
                if required {
                    let k = self.key(key);
                    self.problem(format!("{k} is required"));
                }
                None
            }
            Some(v) => match v.try_into::<T>() {
                Ok(t) => Some(t),
                Err(e) => {
                    let k = self.key(key);
                    self.problem(format!("{k}: {}", e.to_string().trim()));
                    None
                }
            },
        }
    }

    pub(super) fn required<T: DeserializeOwned>(&mut self, key: &str) -> Option<T> {
        self.take(key, true)
    }

    pub(super) fn optional<T: DeserializeOwned>(&mut self, key: &str) -> Option<T> {
        self.take(key, false)
    }

    pub(super) fn table(&mut self, key: &str, required: bool) -> Option<Table> {
        self.take::<Table>(key, required)
    }

    /// A duration such as `30s`, `1m30s`, `500ms`; must be above zero and at most `max` (so that
    /// no `Instant + Duration` in the loop can overflow, and a typo like `60d` is caught).
    pub(super) fn duration(
        &mut self,
        key: &str,
        default: Duration,
        max: Duration,
    ) -> Option<Duration> {
        let raw: Option<Value> = self.optional(key);
        let Some(raw) = raw else {
            return Some(default);
        };
        let k = self.key(key);
        let parsed = match &raw {
            Value::String(s) => humantime::parse_duration(s).map_err(|e| e.to_string()),
            other => Err(format!("expected a string like \"30s\", found {other}")),
        };
        match parsed {
            Ok(d) if d > max => {
                self.problem(format!(
                    "{k} {raw} is too long: at most {} (write a shorter duration)",
                    humantime::format_duration(max)
                ));
                None
            }
            Ok(d) if !d.is_zero() => Some(d),
            Ok(_) => {
                self.problem(format!("{k} must be above zero"));
                None
            }
            Err(e) => {
                self.problem(format!(
                    "{k} {raw}: {e} (write durations like \"30s\" or \"2m\")"
                ));
                None
            }
        }
    }

    /// Report unknown keys, then build the value if nothing in this section failed.
    pub(super) fn finish_with<T>(mut self, build: impl FnOnce() -> Option<T>) -> Option<T> {
        self.finish();
        if self.failed { None } else { build() }
    }

    pub(super) fn finish(&mut self) {
        let unknown: Vec<String> = self.table.keys().map(|k| self.key(k)).collect();
        for k in unknown {
            self.problem(format!("unknown key {k}"));
        }
        self.table.clear();
    }
}

//! `--push URL`: each report's profile sent to a Pyroscope server's
//! `/ingest` endpoint (`format=pprof`, `name=leaktrace.<comm>{pid=...,host=...}`,
//! `from`/`until` in Unix seconds). A push that fails is said on stderr and
//! counted; tracing goes on.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use leaktrace_report::PushCounts;
use ureq::Agent;

/// How long one push may take: the event loop waits for it.
const PUSH_TIMEOUT: Duration = Duration::from_secs(3);

pub struct Pusher {
    url: String,
    name: String,
    agent: Agent,
    /// The end of the last push's window, Unix seconds.
    since: u64,
    pub counts: PushCounts,
}

impl Pusher {
    /// A pusher to `url` (the server, or its `/ingest` endpoint) for the
    /// application `comm` with `labels` (`pid=42`).
    pub fn new(url: &str, comm: &str, labels: &[(&str, String)]) -> anyhow::Result<Self> {
        anyhow::ensure!(
            url.starts_with("http://"),
            "--push {url}: give an http:// URL (the server, e.g. http://pyroscope:4040)"
        );
        let url = if url.trim_end_matches('/').ends_with("/ingest") {
            url.to_string()
        } else {
            format!("{}/ingest", url.trim_end_matches('/'))
        };
        let labels: Vec<String> =
            labels.iter().map(|(key, value)| format!("{key}={value}")).collect();
        let name = format!("leaktrace.{}{{{}}}", application(comm), labels.join(","));
        let agent: Agent = Agent::config_builder()
            .timeout_global(Some(PUSH_TIMEOUT))
            .http_status_as_error(true)
            .build()
            .into();
        Ok(Self { url, name, agent, since: unix_now(), counts: PushCounts::default() })
    }

    /// Send one gzipped profile; a failure is logged and counted.
    pub fn push(&mut self, gzipped: &[u8]) {
        let until = unix_now().max(self.since + 1);
        let result = self
            .agent
            .post(&self.url)
            .query("name", &self.name)
            .query("format", "pprof")
            .query("from", self.since.to_string())
            .query("until", until.to_string())
            .query("spyName", "leaktrace")
            .header("Content-Type", "application/octet-stream")
            .send(gzipped);
        match result {
            Ok(_) => {
                self.counts.sent += 1;
                self.since = until;
            }
            Err(err) => {
                self.counts.failed += 1;
                eprintln!(
                    "leaktrace: push to {} failed ({} so far): {err}; tracing goes on",
                    self.url, self.counts.failed
                );
            }
        }
    }
}

/// A comm as a Pyroscope application name: letters, digits, `_`, `-`, `.`.
fn application(comm: &str) -> String {
    let name: String = comm
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "_-.".contains(c) { c } else { '_' })
        .collect();
    if name.is_empty() {
        "unknown".to_string()
    } else {
        name
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Check the endpoint, the application name and that https is refused.
    #[test]
    fn endpoint_and_name() {
        let pusher =
            Pusher::new("http://127.0.0.1:4040/", "my server", &[("pid", "42".into())]).unwrap();
        assert_eq!(pusher.url, "http://127.0.0.1:4040/ingest");
        assert_eq!(pusher.name, "leaktrace.my_server{pid=42}");
        let pusher = Pusher::new("http://h/ingest", "x", &[]).unwrap();
        assert_eq!(pusher.url, "http://h/ingest");
        assert!(Pusher::new("https://h", "x", &[]).is_err());
    }
}

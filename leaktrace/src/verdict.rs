//! The one plain statement that ends each report, with the numbers behind
//! it: a leak (call sites still growing), a thread leak (threads exited and
//! never joined, or piling up alive), allocator retention (heap RSS rising
//! while live bytes are flat), or no leak. When two causes hold, both.

use serde::Serialize;

use crate::{growth::Trend, report::human_bytes};

/// Exited-unjoined or piling-up threads at one site before it is a leak.
const THREAD_LEAK_MIN: u64 = 3;
/// Heap RSS must exceed live bytes by this much (and twice over) to blame
/// the allocator.
const RETENTION_MIN_EXCESS: u64 = 8 << 20;

#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    /// Each of "leak", "thread_leak", "retention", "no_leak".
    pub kinds: Vec<&'static str>,
    pub text: String,
    /// Sum of the rates of the growing call sites.
    pub leak_bytes_per_second: f64,
}

/// A heap call site still growing.
pub struct GrowingSite {
    /// "function (file:line)".
    pub label: String,
    pub bytes_per_second: f64,
}

/// One pthread_create call site.
pub struct ThreadSiteEvidence {
    pub label: String,
    pub alive: u64,
    pub exited_unjoined: u64,
    /// The number alive or unjoined has kept rising.
    pub piling_up: bool,
    pub stack_bytes: u64,
}

/// The process's heap against what malloc has live.
pub struct RetentionEvidence {
    pub live_bytes: u64,
    pub heap_rss: u64,
    pub heap_rss_trend: Trend,
    pub live_trend: Trend,
}

/// Reports before a trend can be told.
pub const REPORTS_FOR_TREND: usize = 3;

/// Weigh the evidence of the `reports` so far. `growing` is sorted fastest first.
pub fn decide(
    growing: &[GrowingSite],
    threads: &[ThreadSiteEvidence],
    retention: Option<&RetentionEvidence>,
    live_bytes: u64,
    reports: usize,
) -> Verdict {
    let mut kinds = Vec::new();
    let mut statements = Vec::new();
    let leak_rate: f64 = growing.iter().map(|site| site.bytes_per_second).sum();

    if let Some(top) = growing.first() {
        kinds.push("leak");
        let sites = if growing.len() == 1 { "call site" } else { "call sites" };
        statements.push(format!(
            "leak: {} {sites} growing, {}/s in total, top: {}",
            growing.len(),
            human_bytes(leak_rate.max(0.0) as u64),
            top.label
        ));
    }

    if let Some(statement) = thread_statement(threads) {
        kinds.push("thread_leak");
        statements.push(statement);
    }

    if let Some(evidence) = retention {
        let flat = matches!(evidence.live_trend, Trend::Flat | Trend::Plateau | Trend::Shrinking);
        let excess = evidence.heap_rss > 2 * evidence.live_bytes + RETENTION_MIN_EXCESS;
        if evidence.heap_rss_trend == Trend::Growing && flat && excess {
            kinds.push("retention");
            statements.push(format!(
                "allocator retention: {} live in malloc, {} heap RSS and rising while live bytes are flat; \
                 glibc arenas keep freed memory; try malloc_trim(0), MALLOC_ARENA_MAX, or jemalloc/tcmalloc",
                human_bytes(evidence.live_bytes),
                human_bytes(evidence.heap_rss)
            ));
        }
    }

    if kinds.is_empty() {
        kinds.push("no_leak");
        statements.push(if reports < REPORTS_FOR_TREND {
            format!(
                "no leak seen yet: a trend needs {REPORTS_FOR_TREND} reports ({} outstanding)",
                human_bytes(live_bytes)
            )
        } else {
            format!("no leak: live memory flat ({} outstanding)", human_bytes(live_bytes))
        });
    }
    Verdict { kinds, text: statements.join("; "), leak_bytes_per_second: leak_rate }
}

fn thread_statement(threads: &[ThreadSiteEvidence]) -> Option<String> {
    let unjoined: Vec<&ThreadSiteEvidence> =
        threads.iter().filter(|site| site.exited_unjoined >= THREAD_LEAK_MIN).collect();
    let piling: Vec<&ThreadSiteEvidence> =
        threads.iter().filter(|site| site.piling_up && site.alive >= THREAD_LEAK_MIN).collect();
    let mut parts = Vec::new();
    if let Some(worst) = unjoined.iter().max_by_key(|site| site.exited_unjoined) {
        let count: u64 = unjoined.iter().map(|site| site.exited_unjoined).sum();
        parts.push(format!(
            "{count} threads exited but never joined, created at {}, {} of stacks",
            worst.label,
            human_bytes(worst.stack_bytes)
        ));
    }
    if let Some(worst) = piling.iter().max_by_key(|site| site.alive) {
        let count: u64 = piling.iter().map(|site| site.alive).sum();
        parts.push(format!(
            "{count} threads alive and piling up, created at {}, {} of stacks",
            worst.label,
            human_bytes(worst.stack_bytes)
        ));
    }
    (!parts.is_empty()).then(|| format!("thread leak: {}", parts.join(", and ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(label: &str, rate: f64) -> GrowingSite {
        GrowingSite { label: label.into(), bytes_per_second: rate }
    }

    /// Check that growing sites make a leak verdict naming the fastest.
    #[test]
    fn leak() {
        let verdict = decide(&[site("fib (app.c:12)", 8192.0), site("b", 2048.0)], &[], None, 1, 5);
        assert_eq!(verdict.kinds, ["leak"]);
        assert_eq!(
            verdict.text,
            "leak: 2 call sites growing, 10.0 KiB/s in total, top: fib (app.c:12)"
        );
        assert_eq!(verdict.leak_bytes_per_second, 10240.0);
    }

    /// Check that unjoined threads make a thread-leak verdict naming the site.
    #[test]
    fn thread_leak() {
        let threads = [ThreadSiteEvidence {
            label: "spawn_worker (server.c:88)".into(),
            alive: 0,
            exited_unjoined: 12,
            piling_up: true,
            stack_bytes: 96 << 20,
        }];
        let verdict = decide(&[], &threads, None, 0, 5);
        assert_eq!(verdict.kinds, ["thread_leak"]);
        assert!(verdict.text.contains("12 threads exited but never joined, created at spawn_worker (server.c:88), 96.0 MiB"), "{}", verdict.text);
    }

    /// Check that a rising heap with flat live bytes is retention, not a leak.
    #[test]
    fn retention() {
        let evidence = RetentionEvidence {
            live_bytes: 2 << 20,
            heap_rss: 180 << 20,
            heap_rss_trend: Trend::Growing,
            live_trend: Trend::Flat,
        };
        let verdict = decide(&[], &[], Some(&evidence), 2 << 20, 5);
        assert_eq!(verdict.kinds, ["retention"]);
        assert!(
            verdict
                .text
                .starts_with("allocator retention: 2.0 MiB live in malloc, 180.0 MiB heap RSS"),
            "{}",
            verdict.text
        );
    }

    /// Check that two causes are both stated, and that nothing means no leak.
    #[test]
    fn both_or_none() {
        let threads = [ThreadSiteEvidence {
            label: "t".into(),
            alive: 5,
            exited_unjoined: 0,
            piling_up: true,
            stack_bytes: 40 << 20,
        }];
        let verdict = decide(&[site("a", 1.0)], &threads, None, 1, 5);
        assert_eq!(verdict.kinds, ["leak", "thread_leak"]);
        assert!(
            verdict.text.contains("; thread leak: 5 threads alive and piling up"),
            "{}",
            verdict.text
        );
        let verdict = decide(&[], &[], None, 4096, 5);
        assert_eq!(verdict.kinds, ["no_leak"]);
        assert_eq!(verdict.text, "no leak: live memory flat (4.0 KiB outstanding)");
        let verdict = decide(&[], &[], None, 4096, 2);
        assert_eq!(verdict.kinds, ["no_leak"]);
        assert!(verdict.text.starts_with("no leak seen yet"), "{}", verdict.text);
    }
}

//! The verdict that ends each report, as data: a leak (call sites still
//! growing), a thread leak (threads exited and never joined, or piling up
//! alive), allocator retention (heap RSS rising while live bytes are flat),
//! or no leak, each with the numbers behind it. When two causes hold, both.
//! `report::text` turns the findings into prose.

use leaktrace_report::{Finding, ThreadFinding, Trend, Verdict};

/// Exited-unjoined or piling-up threads at one site before it is a leak.
const THREAD_LEAK_MIN: u64 = 3;
/// Heap RSS must exceed live bytes by this much (and twice over) to blame
/// the allocator.
const RETENTION_MIN_EXCESS: u64 = 8 << 20;

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
    let mut findings = Vec::new();
    if let Some(top) = growing.first() {
        findings.push(Finding::Leak {
            sites: growing.len(),
            bytes_per_second: growing.iter().map(|site| site.bytes_per_second).sum(),
            top: top.label.clone(),
        });
    }
    findings.extend(thread_finding(threads));
    if let Some(evidence) = retention {
        let flat = matches!(evidence.live_trend, Trend::Flat | Trend::Plateau | Trend::Shrinking);
        let excess = evidence.heap_rss > 2 * evidence.live_bytes + RETENTION_MIN_EXCESS;
        if evidence.heap_rss_trend == Trend::Growing && flat && excess {
            findings.push(Finding::Retention {
                live_bytes: evidence.live_bytes,
                heap_rss: evidence.heap_rss,
            });
        }
    }
    if findings.is_empty() {
        findings.push(if reports < REPORTS_FOR_TREND {
            Finding::NoLeakYet { outstanding: live_bytes, reports_needed: REPORTS_FOR_TREND }
        } else {
            Finding::NoLeak { outstanding: live_bytes }
        });
    }
    Verdict::new(findings)
}

fn thread_finding(threads: &[ThreadSiteEvidence]) -> Option<Finding> {
    let worst = |sites: Vec<&ThreadSiteEvidence>, count: fn(&ThreadSiteEvidence) -> u64| {
        let site = sites.iter().max_by_key(|site| count(site))?;
        Some(ThreadFinding {
            threads: sites.iter().map(|site| count(site)).sum(),
            site: site.label.clone(),
            stack_bytes: site.stack_bytes,
        })
    };
    let unjoined = worst(
        threads.iter().filter(|site| site.exited_unjoined >= THREAD_LEAK_MIN).collect(),
        |site| site.exited_unjoined,
    );
    let piling_up = worst(
        threads.iter().filter(|site| site.piling_up && site.alive >= THREAD_LEAK_MIN).collect(),
        |site| site.alive,
    );
    (unjoined.is_some() || piling_up.is_some())
        .then_some(Finding::ThreadLeak { unjoined, piling_up })
}

#[cfg(test)]
mod tests {
    use leaktrace_report::VerdictKind;

    use super::*;

    fn site(label: &str, rate: f64) -> GrowingSite {
        GrowingSite { label: label.into(), bytes_per_second: rate }
    }

    /// Check that growing sites make a leak verdict naming the fastest.
    #[test]
    fn leak() {
        let verdict = decide(&[site("fib (app.c:12)", 8192.0), site("b", 2048.0)], &[], None, 1, 5);
        assert_eq!(verdict.kinds, [VerdictKind::Leak]);
        assert_eq!(
            verdict.findings,
            [Finding::Leak { sites: 2, bytes_per_second: 10240.0, top: "fib (app.c:12)".into() }]
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
        assert_eq!(verdict.kinds, [VerdictKind::ThreadLeak]);
        let expected = ThreadFinding {
            threads: 12,
            site: "spawn_worker (server.c:88)".into(),
            stack_bytes: 96 << 20,
        };
        assert_eq!(
            verdict.findings,
            [Finding::ThreadLeak { unjoined: Some(expected), piling_up: None }]
        );
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
        assert_eq!(verdict.kinds, [VerdictKind::Retention]);
        assert_eq!(
            verdict.findings,
            [Finding::Retention { live_bytes: 2 << 20, heap_rss: 180 << 20 }]
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
        assert_eq!(verdict.kinds, [VerdictKind::Leak, VerdictKind::ThreadLeak]);
        let verdict = decide(&[], &[], None, 4096, 5);
        assert_eq!(verdict.kinds, [VerdictKind::NoLeak]);
        assert_eq!(verdict.findings, [Finding::NoLeak { outstanding: 4096 }]);
        let verdict = decide(&[], &[], None, 4096, 2);
        assert_eq!(verdict.kinds, [VerdictKind::NoLeak]);
        assert_eq!(
            verdict.findings,
            [Finding::NoLeakYet { outstanding: 4096, reports_needed: REPORTS_FOR_TREND }]
        );
    }
}

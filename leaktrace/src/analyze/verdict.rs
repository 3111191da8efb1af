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
    /// Its outstanding allocations' recent rate.
    pub allocations_per_second: f64,
}

/// Memory allocated before attach, being freed now.
pub struct Replacement {
    pub count_per_second: f64,
    pub bytes_per_second: Option<f64>,
}

/// How much faster than the frees of pre-attach memory the sites they
/// explain may grow, with a floor of a block a second: both rates are
/// slopes over the same few reports, and a ring replaced member by member
/// matches to within a few percent.
const REPLACEMENT_SLACK: f64 = 0.15;
/// Growing sites searched exhaustively for the set the replacement explains.
const MAX_EXHAUSTIVE: usize = 16;

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

/// What the process's live memory as a whole did.
pub struct LiveEvidence {
    pub bytes: u64,
    pub trend: Trend,
    pub bytes_per_second: f64,
    /// It rose since the last report by more than noise.
    pub rising: bool,
    /// Call sites seen for fewer reports than a trend needs.
    pub new_sites: usize,
    /// Events lost that the books miss (not stacks cut short).
    pub lost: u64,
}

/// Weigh the evidence of the `reports` so far. `growing` is sorted fastest first.
pub fn decide(
    growing: &[GrowingSite],
    replacement: Option<&Replacement>,
    threads: &[ThreadSiteEvidence],
    retention: Option<&RetentionEvidence>,
    live: &LiveEvidence,
    reports: usize,
) -> Verdict {
    let live_bytes = live.bytes;
    let mut findings = Vec::new();
    let explained = replacement
        .map_or_else(Vec::new, |replacement| explained_by(growing, replacement.count_per_second));
    let growing: Vec<&GrowingSite> = growing
        .iter()
        .enumerate()
        .filter(|(i, _)| !explained.contains(i))
        .map(|(_, s)| s)
        .collect();
    if let Some(top) = growing.first() {
        findings.push(Finding::Leak {
            sites: growing.len(),
            bytes_per_second: growing.iter().map(|site| site.bytes_per_second).sum(),
            top: top.label.clone(),
        });
    }
    if let (Some(replacement), false) = (replacement, explained.is_empty()) {
        findings.push(Finding::Replacing {
            sites: explained.len(),
            count_per_second: replacement.count_per_second,
            bytes_per_second: replacement.bytes_per_second,
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
        // "No leak" is said only of memory that stopped moving: not while
        // the total grows, nor while it rose just now, nor while call sites
        // are too new to have a trend.
        let too_early = reports < REPORTS_FOR_TREND
            || live.trend == Trend::New
            || live.rising
            || live.new_sites > 0;
        if live.trend == Trend::Growing {
            findings.push(Finding::Growth { bytes_per_second: live.bytes_per_second });
        } else if live.lost > 0 {
            // Said below: a verdict of "no leak" from incomplete books is
            // not given.
        } else if too_early {
            findings.push(Finding::NoLeakYet {
                outstanding: live_bytes,
                reports_needed: REPORTS_FOR_TREND,
            });
        } else {
            findings.push(Finding::NoLeak { outstanding: live_bytes });
        }
    }
    if live.lost > 0 {
        findings.push(Finding::Incomplete { lost: live.lost });
    }
    Verdict::new(findings)
}

/// The growing sites (indices) whose outstanding allocations rise no faster
/// together than blocks allocated before attach are freed: the largest such
/// set, since a replaced structure's new members are all the frees explain.
/// A real leak beside it keeps its own pace and stays out of the set unless
/// it is smaller than the slack.
fn explained_by(growing: &[GrowingSite], frees_per_second: f64) -> Vec<usize> {
    if frees_per_second <= 0.0 || growing.is_empty() {
        return Vec::new();
    }
    let budget = frees_per_second * (1.0 + REPLACEMENT_SLACK) + 1.0;
    let rate = |i: usize| growing[i].allocations_per_second.max(0.0);
    if growing.len() > MAX_EXHAUSTIVE {
        // Greedy, slowest first: many small sites fill the budget.
        let mut order: Vec<usize> = (0..growing.len()).collect();
        order.sort_by(|&a, &b| rate(a).total_cmp(&rate(b)));
        let mut sum = 0.0;
        return order
            .into_iter()
            .take_while(|&i| {
                sum += rate(i);
                sum <= budget
            })
            .collect();
    }
    let mut best = (0.0, 0u32);
    for mask in 1..(1u32 << growing.len()) {
        let sum: f64 = (0..growing.len()).filter(|i| mask & (1 << i) != 0).map(rate).sum();
        if sum <= budget && sum > best.0 {
            best = (sum, mask);
        }
    }
    (0..growing.len()).filter(|i| best.1 & (1 << i) != 0).collect()
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

    /// Live memory of `bytes`, flat for long, nothing lost.
    fn settled(bytes: u64) -> LiveEvidence {
        LiveEvidence {
            bytes,
            trend: Trend::Flat,
            bytes_per_second: 0.0,
            rising: false,
            new_sites: 0,
            lost: 0,
        }
    }

    /// Check that "no leak" is not said while the total grows or rose just
    /// now or sites are new, nor while events are lost.
    #[test]
    fn no_leak_only_when_settled() {
        let kinds = |live: LiveEvidence| decide(&[], None, &[], None, &live, 9).kinds;
        assert_eq!(kinds(settled(4096)), [VerdictKind::NoLeak]);
        let growing =
            LiveEvidence { trend: Trend::Growing, bytes_per_second: 512.0, ..settled(4096) };
        assert_eq!(kinds(growing), [VerdictKind::Growth]);
        let rising = LiveEvidence { rising: true, ..settled(4096) };
        let verdict = decide(&[], None, &[], None, &rising, 9);
        assert!(matches!(verdict.findings[..], [Finding::NoLeakYet { .. }]), "{verdict:?}");
        let fresh = LiveEvidence { new_sites: 2, ..settled(4096) };
        let verdict = decide(&[], None, &[], None, &fresh, 9);
        assert!(matches!(verdict.findings[..], [Finding::NoLeakYet { .. }]), "{verdict:?}");
        assert_eq!(kinds(LiveEvidence { lost: 7, ..settled(4096) }), [VerdictKind::Incomplete]);
        let leak =
            decide(&[site("a", 1.0)], None, &[], None, &LiveEvidence { lost: 7, ..settled(1) }, 9);
        assert_eq!(leak.kinds, [VerdictKind::Leak, VerdictKind::Incomplete]);
    }

    fn site(label: &str, rate: f64) -> GrowingSite {
        GrowingSite {
            label: label.into(),
            bytes_per_second: rate,
            allocations_per_second: rate / 100.0,
        }
    }

    /// Check that growing sites make a leak verdict naming the fastest.
    #[test]
    fn leak() {
        let verdict = decide(
            &[site("fib (app.c:12)", 8192.0), site("b", 2048.0)],
            None,
            &[],
            None,
            &settled(1),
            5,
        );
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
        let verdict = decide(&[], None, &threads, None, &settled(0), 5);
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
        let verdict = decide(&[], None, &[], Some(&evidence), &settled(2 << 20), 5);
        assert_eq!(verdict.kinds, [VerdictKind::Retention]);
        assert_eq!(
            verdict.findings,
            [Finding::Retention { live_bytes: 2 << 20, heap_rss: 180 << 20 }]
        );
    }

    /// Check that sites growing as fast as pre-attach memory is freed are
    /// replacement, while a leak beside them keeps its own pace and stays one.
    #[test]
    fn replacement_explains_its_pace() {
        let ring = GrowingSite {
            label: "ring_put (ring.c:40)".into(),
            bytes_per_second: 51200.0,
            allocations_per_second: 200.0,
        };
        let leak = GrowingSite {
            label: "leak (ring.c:60)".into(),
            bytes_per_second: 25600.0,
            allocations_per_second: 50.0,
        };
        let frees = Replacement { count_per_second: 196.0, bytes_per_second: Some(50000.0) };
        let verdict = decide(&[ring, leak], Some(&frees), &[], None, &settled(1), 5);
        assert_eq!(verdict.kinds, [VerdictKind::Leak, VerdictKind::Replacing]);
        assert!(
            matches!(&verdict.findings[0], Finding::Leak { sites: 1, top, .. } if top == "leak (ring.c:60)"),
            "{:?}",
            verdict.findings
        );
        assert_eq!(verdict.leak_bytes_per_second, 25600.0);
        let ring_alone = [GrowingSite {
            label: "ring_put".into(),
            bytes_per_second: 51200.0,
            allocations_per_second: 200.0,
        }];
        let verdict = decide(&ring_alone, Some(&frees), &[], None, &settled(1), 5);
        assert_eq!(verdict.kinds, [VerdictKind::Replacing]);
        let no_frees = Replacement { count_per_second: 0.0, bytes_per_second: None };
        let verdict = decide(&ring_alone, Some(&no_frees), &[], None, &settled(1), 5);
        assert_eq!(verdict.kinds, [VerdictKind::Leak]);
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
        let verdict = decide(&[site("a", 1.0)], None, &threads, None, &settled(1), 5);
        assert_eq!(verdict.kinds, [VerdictKind::Leak, VerdictKind::ThreadLeak]);
        let verdict = decide(&[], None, &[], None, &settled(4096), 5);
        assert_eq!(verdict.kinds, [VerdictKind::NoLeak]);
        assert_eq!(verdict.findings, [Finding::NoLeak { outstanding: 4096 }]);
        let verdict = decide(&[], None, &[], None, &settled(4096), 2);
        assert_eq!(verdict.kinds, [VerdictKind::NoLeak]);
        assert_eq!(
            verdict.findings,
            [Finding::NoLeakYet { outstanding: 4096, reports_needed: REPORTS_FOR_TREND }]
        );
    }
}

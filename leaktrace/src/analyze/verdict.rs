//! The verdict that ends each report, as data: a leak (call sites still
//! growing), a thread leak (threads exited and never joined, or piling up
//! alive), allocator retention (heap RSS rising while live bytes are flat),
//! or no leak, each with the numbers behind it. When two causes hold, both.
//! `report::text` turns the findings into prose.

use std::collections::BTreeMap;

use leaktrace_report::{
    is_runtime_frame, Finding, Frame, ReplacementEvidence, ReplacingSite, ThreadFinding, Trend,
    Verdict,
};

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
    /// The size class of its blocks (`leaktrace_common::size_class`),
    /// where the allocator's chunk sizes are known.
    pub size_class: Option<u32>,
    /// The functions its blocks are allocated in: the first
    /// [`EVIDENCE_DEPTH`] of its stack outside the allocator and the
    /// language runtime, never the outermost (`main`, a thread's start)
    /// unless it is the only one.
    pub functions: Vec<String>,
}

/// Memory allocated before attach, being freed now.
pub struct Replacement {
    pub count_per_second: f64,
    pub bytes_per_second: Option<f64>,
    /// Those frees a second in each size class, where chunk sizes are known.
    pub class_rates: Option<Vec<f64>>,
    /// A sample of those frees' stacks: the functions each frees in (as
    /// [`GrowingSite::functions`]) and how many frees it had.
    pub free_paths: Vec<(Vec<String>, u64)>,
}

/// Functions of a stack weighed as its site's own, innermost first.
pub const EVIDENCE_DEPTH: usize = 2;
/// Frees a second of a size class below which they are no evidence.
const MIN_CLASS_RATE: f64 = 0.5;

/// How much faster than the frees of pre-attach memory the sites they
/// explain may grow, with a floor of a fifth of a block a second: both rates are
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

/// What the target held when it exited, once it has.
pub struct ExitEvidence {
    pub bytes: u64,
    pub blocks: u64,
    pub sites: usize,
    /// The site holding the most.
    pub top: String,
}

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

/// Which growing sites replace memory from before attach, with the
/// evidence (same order as `growing`; `None`: judged like any other).
///
/// Replacement is a claim about a call site, and needs evidence about that
/// site: frees of pre-attach blocks of its size class (where the
/// allocator tells sizes), and a sampled free's stack through one of its
/// own functions ([`GrowingSite::functions`]). Among the sites with such
/// evidence, per size class, the largest set whose pace those frees cover
/// is explained; a site growing faster stays a leak.
pub fn replaced_sites(
    growing: &[GrowingSite],
    replacement: Option<&Replacement>,
) -> Vec<Option<ReplacementEvidence>> {
    let mut explained = vec![None; growing.len()];
    let Some(replacement) = replacement else {
        return explained;
    };
    let mut groups: BTreeMap<Option<u32>, Vec<(usize, ReplacementEvidence)>> = BTreeMap::new();
    for (index, site) in growing.iter().enumerate() {
        if let Some(evidence) = site_evidence(site, replacement) {
            let class = site.size_class.filter(|_| replacement.class_rates.is_some());
            groups.entry(class).or_default().push((index, evidence));
        }
    }
    for (class, members) in groups {
        let rate = match (class, &replacement.class_rates) {
            (Some(class), Some(rates)) => rates.get(class as usize).copied().unwrap_or(0.0),
            _ => replacement.count_per_second,
        };
        let sites: Vec<&GrowingSite> = members.iter().map(|&(index, _)| &growing[index]).collect();
        for chosen in explained_by(&sites, rate) {
            let (index, evidence) = &members[chosen];
            explained[*index] = Some(evidence.clone());
        }
    }
    explained
}

/// What ties `site` to the frees of pre-attach memory, if enough does.
fn site_evidence(site: &GrowingSite, replacement: &Replacement) -> Option<ReplacementEvidence> {
    let same_size = match &replacement.class_rates {
        Some(rates) => {
            let rate = rates.get(site.size_class? as usize).copied().unwrap_or(0.0);
            if rate < MIN_CLASS_RATE {
                return None;
            }
            Some(rate)
        }
        None => None,
    };
    let (function, sampled) = shared_function(&site.functions, &replacement.free_paths)?;
    Some(ReplacementEvidence {
        same_size_frees_per_second: same_size,
        freed_in: Some(function),
        sampled_frees: sampled,
    })
}

/// The first of `functions` that sampled frees' stacks also pass
/// through, and how many of those frees did.
fn shared_function(functions: &[String], frees: &[(Vec<String>, u64)]) -> Option<(String, u64)> {
    functions.iter().find_map(|function| {
        let count: u64 =
            frees.iter().filter(|(path, _)| path.contains(function)).map(|(_, count)| count).sum();
        (count > 0).then(|| (function.clone(), count))
    })
}

/// Where every stack of a process starts (the program's entry, `main`, a
/// thread's start): never evidence of what a call site does.
const ENTRY_FUNCTIONS: [&str; 7] =
    ["_start", "main", "start_thread", "thread_start", "clone", "clone3", "__libc_start_main"];

/// The functions a stack's blocks are allocated (or freed) in, as
/// [`GrowingSite::functions`] has them: its first [`EVIDENCE_DEPTH`]
/// named frames outside the allocator, the language runtime and the entry
/// functions, without the outermost of them (a thread's start routine,
/// which its every stack shares) unless it is the only one.
pub fn own_functions(frames: &[Frame]) -> Vec<String> {
    let named: Vec<&str> = frames
        .iter()
        .filter(|frame| !is_runtime_frame(frame))
        .filter_map(|frame| frame.symbol.as_deref())
        .filter(|name| !ENTRY_FUNCTIONS.contains(name) && !name.starts_with("__libc_start"))
        .collect();
    let own = if named.len() > 1 { &named[..named.len() - 1] } else { &named[..] };
    own.iter().take(EVIDENCE_DEPTH).map(|name| name.to_string()).collect()
}

/// Weigh the evidence of the `reports` so far. `growing` is sorted fastest
/// first.
pub fn decide(
    growing: &[GrowingSite],
    replacement: Option<&Replacement>,
    threads: &[ThreadSiteEvidence],
    retention: Option<&RetentionEvidence>,
    live: &LiveEvidence,
    exit: Option<&ExitEvidence>,
    reports: usize,
) -> Verdict {
    let live_bytes = live.bytes;
    let mut findings = Vec::new();
    let replaced = replaced_sites(growing, replacement);
    let explained: Vec<(&GrowingSite, &ReplacementEvidence)> = growing
        .iter()
        .zip(&replaced)
        .filter_map(|(site, evidence)| Some((site, evidence.as_ref()?)))
        .collect();
    let growing: Vec<&GrowingSite> = growing
        .iter()
        .zip(&replaced)
        .filter(|(_, evidence)| evidence.is_none())
        .map(|(site, _)| site)
        .collect();
    if let Some(top) = growing.first() {
        findings.push(Finding::Leak {
            sites: growing.len(),
            bytes_per_second: growing.iter().map(|site| site.bytes_per_second).sum(),
            top: top.label.clone(),
        });
    }
    // While sites replace, the verdict says so: never "no leak".
    if let (Some(replacement), false) = (replacement, explained.is_empty()) {
        findings.push(Finding::Replacing {
            sites: explained.len(),
            count_per_second: replacement.count_per_second,
            bytes_per_second: replacement.bytes_per_second,
            top: explained.first().map(|(site, evidence)| ReplacingSite {
                label: site.label.clone(),
                evidence: (*evidence).clone(),
            }),
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
    // After exit, what was never freed is a fact: said whatever the trends.
    if let Some(exit) = exit {
        if exit.bytes > 0 {
            findings.push(Finding::InUseAtExit {
                bytes: exit.bytes,
                blocks: exit.blocks,
                sites: exit.sites,
                top: exit.top.clone(),
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
fn explained_by(growing: &[&GrowingSite], frees_per_second: f64) -> Vec<usize> {
    if frees_per_second <= 0.0 || growing.is_empty() {
        return Vec::new();
    }
    // A floor of a fifth of a block a second: slopes of a few reports.
    let budget = frees_per_second * (1.0 + REPLACEMENT_SLACK) + 0.2;
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
        let kinds = |live: LiveEvidence| decide(&[], None, &[], None, &live, None, 9).kinds;
        assert_eq!(kinds(settled(4096)), [VerdictKind::NoLeak]);
        let growing =
            LiveEvidence { trend: Trend::Growing, bytes_per_second: 512.0, ..settled(4096) };
        assert_eq!(kinds(growing), [VerdictKind::Growth]);
        let rising = LiveEvidence { rising: true, ..settled(4096) };
        let verdict = decide(&[], None, &[], None, &rising, None, 9);
        assert!(matches!(verdict.findings[..], [Finding::NoLeakYet { .. }]), "{verdict:?}");
        let fresh = LiveEvidence { new_sites: 2, ..settled(4096) };
        let verdict = decide(&[], None, &[], None, &fresh, None, 9);
        assert!(matches!(verdict.findings[..], [Finding::NoLeakYet { .. }]), "{verdict:?}");
        assert_eq!(kinds(LiveEvidence { lost: 7, ..settled(4096) }), [VerdictKind::Incomplete]);
        let leak = decide(
            &[site("a", 1.0)],
            None,
            &[],
            None,
            &LiveEvidence { lost: 7, ..settled(1) },
            None,
            9,
        );
        assert_eq!(leak.kinds, [VerdictKind::Leak, VerdictKind::Incomplete]);
    }

    fn site(label: &str, rate: f64) -> GrowingSite {
        GrowingSite {
            label: label.into(),
            bytes_per_second: rate,
            allocations_per_second: rate / 100.0,
            size_class: None,
            functions: vec![label.into()],
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
            None,
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
        let verdict = decide(&[], None, &threads, None, &settled(0), None, 5);
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
        let verdict = decide(&[], None, &[], Some(&evidence), &settled(2 << 20), None, 5);
        assert_eq!(verdict.kinds, [VerdictKind::Retention]);
        assert_eq!(
            verdict.findings,
            [Finding::Retention { live_bytes: 2 << 20, heap_rss: 180 << 20 }]
        );
    }

    /// A growing site allocating `per_second` blocks of size class
    /// `class` in `function`.
    fn growing(function: &str, per_second: f64, class: Option<u32>) -> GrowingSite {
        GrowingSite {
            label: format!("{function} (ring.c:40)"),
            bytes_per_second: per_second * 256.0,
            allocations_per_second: per_second,
            size_class: class,
            functions: vec![function.into()],
        }
    }

    /// Frees of pre-attach memory: `per_second` in all, of size class 16
    /// when `sized`, their sampled stacks through `freed_in`.
    fn frees(per_second: f64, sized: bool, freed_in: &[&str]) -> Replacement {
        let mut rates = vec![0.0; 94];
        rates[16] = per_second;
        Replacement {
            count_per_second: per_second,
            bytes_per_second: sized.then_some(per_second * 256.0),
            class_rates: sized.then_some(rates),
            free_paths: freed_in.iter().map(|f| (vec![f.to_string(), "main".into()], 10)).collect(),
        }
    }

    /// Check, on a table of sites and frees, that only a site with evidence
    /// about itself (its size class freed, where sizes are known, and a
    /// sampled free in one of its functions) is `replacing`, and only at
    /// the frees' pace; every other growing site is a leak.
    #[test]
    fn replacement_needs_evidence_about_the_site() {
        use VerdictKind::{Leak, Replacing};
        let ring = || growing("ring_put", 200.0, Some(16));
        type Case = (&'static str, Vec<GrowingSite>, Replacement, Vec<VerdictKind>, Vec<bool>);
        let cases: Vec<Case> = vec![
            (
                "ring alone",
                vec![ring()],
                frees(196.0, true, &["ring_put"]),
                vec![Replacing],
                vec![true],
            ),
            (
                "a leak of another size beside the ring",
                vec![ring(), growing("leak", 50.0, Some(32))],
                frees(196.0, true, &["ring_put"]),
                vec![Leak, Replacing],
                vec![true, false],
            ),
            (
                "a slow leak of the same size class in another function",
                vec![ring(), growing("leak", 5.0, Some(16))],
                frees(196.0, true, &["ring_put"]),
                vec![Leak, Replacing],
                vec![true, false],
            ),
            (
                "frees of another size class",
                vec![ring()],
                Replacement {
                    class_rates: Some(vec![0.0; 94]),
                    ..frees(196.0, true, &["ring_put"])
                },
                vec![Leak],
                vec![false],
            ),
            (
                "no sampled free through the site (thread teardown, another structure)",
                vec![ring()],
                frees(196.0, true, &["start_thread"]),
                vec![Leak],
                vec![false],
            ),
            (
                "sizes unknown (jemalloc): the stacks alone",
                vec![growing("ring_put", 200.0, None), growing("leak", 5.0, None)],
                frees(196.0, false, &["ring_put"]),
                vec![Leak, Replacing],
                vec![true, false],
            ),
            (
                "growing far faster than the frees",
                vec![growing("ring_put", 400.0, Some(16))],
                frees(196.0, true, &["ring_put"]),
                vec![Leak],
                vec![false],
            ),
            ("no frees at all", vec![ring()], frees(0.0, true, &[]), vec![Leak], vec![false]),
        ];
        for (name, sites, replacement, kinds, replaced) in cases {
            let verdict = decide(&sites, Some(&replacement), &[], None, &settled(1), None, 5);
            assert_eq!(verdict.kinds, kinds, "{name}: {:?}", verdict.findings);
            let found: Vec<bool> =
                replaced_sites(&sites, Some(&replacement)).iter().map(Option::is_some).collect();
            assert_eq!(found, replaced, "{name}");
        }
        let sites = [ring()];
        let replacement = frees(196.0, true, &["ring_put"]);
        let verdict = decide(&sites, Some(&replacement), &[], None, &settled(1), None, 5);
        let Finding::Replacing { top: Some(top), sites: 1, .. } = &verdict.findings[0] else {
            panic!("{:?}", verdict.findings)
        };
        assert_eq!(top.evidence.freed_in.as_deref(), Some("ring_put"));
        assert_eq!(top.evidence.same_size_frees_per_second, Some(196.0));
    }

    /// Check that a stack's own functions leave out the allocator, the
    /// runtime, the entry functions and the outermost of the rest.
    #[test]
    fn own_functions_of_a_stack() {
        let frame = |symbol: &str, module: &str| Frame {
            address: 0,
            symbol: Some(symbol.into()),
            offset: None,
            file: None,
            line: None,
            module: Some(module.into()),
            inlined: false,
            mangled: None,
        };
        let (app, libc) = ("/usr/bin/app", "/usr/lib/x86_64-linux-gnu/libc.so.6");
        let names = |frames: &[Frame]| own_functions(frames);
        let main_stack = [
            frame("leak", app),
            frame("main", app),
            frame("__libc_start_call_main", libc),
            frame("_start", app),
        ];
        assert_eq!(names(&main_stack), ["leak"]);
        let thread_stack = [
            frame("malloc", libc),
            frame("create_session", app),
            frame("store_put", app),
            frame("worker", app),
            frame("start_thread", libc),
        ];
        assert_eq!(names(&thread_stack), ["create_session", "store_put"]);
        assert_eq!(names(&[frame("ring_put", app), frame("worker", app)]), ["ring_put"]);
        assert_eq!(names(&[frame("only", app)]), ["only"]);
    }

    /// Check that a target that exited holding memory gets "in use at exit"
    /// at once, whatever the trends (too few reports, none growing), and
    /// beside a leak already seen; one that held nothing, no finding.
    #[test]
    fn in_use_at_exit_is_a_fact() {
        let exit =
            ExitEvidence { bytes: 4 << 20, blocks: 10_000, sites: 2, top: "leak (a.c:3)".into() };
        let early = LiveEvidence { trend: Trend::New, ..settled(4 << 20) };
        let verdict = decide(&[], None, &[], None, &early, Some(&exit), 1);
        assert_eq!(verdict.kinds, [VerdictKind::InUseAtExit]);
        let verdict = decide(&[site("leak", 8.0)], None, &[], None, &early, Some(&exit), 6);
        assert_eq!(verdict.kinds, [VerdictKind::Leak, VerdictKind::InUseAtExit]);
        let nothing = ExitEvidence { bytes: 0, blocks: 0, sites: 0, top: String::new() };
        let verdict = decide(&[], None, &[], None, &settled(0), Some(&nothing), 6);
        assert_eq!(verdict.kinds, [VerdictKind::NoLeak]);
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
        let verdict = decide(&[site("a", 1.0)], None, &threads, None, &settled(1), None, 5);
        assert_eq!(verdict.kinds, [VerdictKind::Leak, VerdictKind::ThreadLeak]);
        let verdict = decide(&[], None, &[], None, &settled(4096), None, 5);
        assert_eq!(verdict.kinds, [VerdictKind::NoLeak]);
        assert_eq!(verdict.findings, [Finding::NoLeak { outstanding: 4096 }]);
        let verdict = decide(&[], None, &[], None, &settled(4096), None, 2);
        assert_eq!(verdict.kinds, [VerdictKind::NoLeak]);
        assert_eq!(
            verdict.findings,
            [Finding::NoLeakYet { outstanding: 4096, reports_needed: REPORTS_FOR_TREND }]
        );
    }
}

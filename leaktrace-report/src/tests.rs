use super::*;

fn frame(symbol: Option<&str>) -> Frame {
    Frame {
        address: 0x55d0_c2a4_a21c,
        symbol: symbol.map(String::from),
        offset: Some(0x1d),
        file: Some("/src/app.c".into()),
        line: Some(12),
        module: Some("/usr/bin/app".into()),
        inlined: false,
        mangled: None,
    }
}

fn sample() -> Report {
    Report {
        schema: SCHEMA,
        is_final: true,
        time: "2026-11-22T06:40:03Z".into(),
        pid: 7,
        older_ms: 500,
        totals: Totals { bytes: 4096, allocations: 2 },
        stack_count: 1,
        stacks: vec![
            StackReport {
                bytes: 4096,
                allocations: 2,
                frames: vec![frame(Some("leak")), frame(None)],
                stack_end: StackEnd::NoInfo,
                growth: Some(Growth { bytes_per_second: 100.0, trend: Trend::Growing }),
                kind: None,
                cache: None,
                processes: Vec::new(),
                allocs: Vec::new(),
                delta: None,
                api: None,
                replacing: None,
            },
            StackReport {
                bytes: 192,
                allocations: 1,
                frames: vec![frame(Some("alloc_empty_file"))],
                stack_end: StackEnd::Complete,
                growth: None,
                kind: Some(KernelKind::Slab),
                cache: Some("filp".into()),
                processes: vec![ProcessShare { pid: 7, comm: "server".into(), bytes: 192 }],
                allocs: Vec::new(),
                delta: None,
                api: None,
                replacing: None,
            },
        ],
        system: Some(SystemReport {
            meminfo: [
                ("mem_available".to_string(), 1 << 30),
                ("mem_available_delta".into(), -4096),
            ]
            .into_iter()
            .collect(),
            slabs: vec![SlabReport {
                name: "filp".into(),
                bytes: 192,
                delta: 192,
                trend: Trend::Growing,
                bytes_per_second: 19.2,
                reclaimable: false,
            }],
            ..SystemReport::default()
        }),
        lost: Lost::ALL.iter().map(|&reason| (reason, 0)).collect(),
        verdict: Some(Verdict::new(vec![Finding::Leak {
            sites: 1,
            bytes_per_second: 100.0,
            top: "leak (app.c:12)".into(),
        }])),
        sample_rate: 1,
        ..Report::default()
    }
}

/// Check that a report reads back as what was written.
#[test]
fn round_trip() {
    let report = sample();
    let json = serde_json::to_string(&report).unwrap();
    let back: Report = serde_json::from_str(&json).unwrap();
    assert_eq!(back, report);
}

/// Check that the JSON contract's field names and values are there.
#[test]
fn json_contract() {
    let value = serde_json::to_value(sample()).unwrap();
    for key in [
        "type",
        "final",
        "time",
        "pid",
        "exited",
        "older_ms",
        "totals",
        "stack_count",
        "stacks",
        "lost",
    ] {
        assert!(value.get(key).is_some(), "{key} missing from {value}");
    }
    assert_eq!(value["type"], "report");
    assert_eq!(value["schema"], SCHEMA);
    assert_eq!(value["stacks"][0]["frames"][0]["address"], "0x55d0c2a4a21c");
    assert_eq!(value["stacks"][0]["stack_end"], "no_unwind_info");
    assert_eq!(value["stacks"][0]["growth"]["trend"], "growing");
    assert_eq!(value["lost"]["stack_map_full_or_collision"], 0);
    assert_eq!(value["lost"]["alloc_map_full"], 0);
    assert_eq!(value["verdict"]["kinds"][0], "leak");
    assert_eq!(value["verdict"]["leak_bytes_per_second"], 100.0);
}

/// Check that a site is labelled by its first frame outside the runtime.
#[test]
fn labels() {
    assert_eq!(site_label(&[frame(Some("leak"))]), "leak (app.c:12)");
    assert_eq!(site_label(&[]), "an unknown stack");
    let runtime =
        Frame { symbol: Some("<alloc::raw_vec::RawVecInner>::finish_grow".into()), ..frame(None) };
    assert_eq!(site_label(&[runtime, frame(Some("leak"))]), "leak (app.c:12)");
    let libc = Frame {
        symbol: Some("__strdup".into()),
        module: Some("/usr/lib/x86_64-linux-gnu/libc.so.6".into()),
        ..frame(None)
    };
    assert_eq!(site_label(&[libc.clone(), frame(Some("dup_name"))]), "dup_name (app.c:12)");
    assert_eq!(site_label(&[libc]), "__strdup (app.c:12)");
    let unknown = Frame { file: None, ..frame(None) };
    assert_eq!(unknown.label(), "[app]+0x1d");
}

/// Check that text that is not leaktrace output is refused with its line.
#[test]
fn not_a_report() {
    let err = read_reports("{\"hello\": 1}\n".as_bytes()).unwrap_err();
    assert!(err.to_string().starts_with("line 1 is not a leaktrace report"), "{err}");
    assert!(matches!(read_reports("plain text\n".as_bytes()), Err(ReadError::Empty)));
    let line = serde_json::to_string(&sample()).unwrap();
    let reports = read_reports(format!("program output\n{line}\n").as_bytes()).unwrap();
    assert_eq!(reports.len(), 1);
}

/// Check that the last final report is kept as the input streams by, and
/// that an endless line and impossible counts are refused with their line.
#[test]
fn last_report_streamed_and_checked() {
    let mut first = sample();
    first.is_final = false;
    first.pid = 1;
    let last = sample();
    let text = format!(
        "{}\n{}\n{}\n",
        serde_json::to_string(&first).unwrap(),
        serde_json::to_string(&last).unwrap(),
        serde_json::to_string(&first).unwrap()
    );
    assert_eq!(read_last_report(text.as_bytes()).unwrap().pid, 7);

    use std::io::Read as _;
    let endless = std::io::BufReader::new(std::io::repeat(b'{').take(MAX_LINE as u64 + 10));
    let err = read_last_report(endless).unwrap_err();
    assert!(matches!(err, ReadError::LineTooLong { line: 1 }), "{err}");

    let mut huge = sample();
    huge.stacks[0].bytes = 1 << 63;
    let text = format!("{}\n", serde_json::to_string(&huge).unwrap());
    let err = read_last_report(text.as_bytes()).unwrap_err();
    assert!(err.to_string().contains("line 1: a stack's bytes is 9223372036854775808"), "{err}");
}

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Check that `since` subtracts every field, with the sign.
#[test]
fn since_subtracts() {
    let baseline = MemoryPicture {
        rss: 10 * MIB,
        swap: 4 * MIB,
        threads: 4,
        heap: Usage { rss: 2 * MIB, ..Usage::default() },
        thread_stacks: Usage { rss: 24 * KIB, count: 3, ..Usage::default() },
        ..MemoryPicture::default()
    };
    let now = MemoryPicture {
        rss: 30 * MIB,
        pss: MIB,
        uss: MIB,
        writable_private: 2 * MIB,
        threads: 2,
        heap: Usage { rss: 22 * MIB, ..Usage::default() },
        thread_stacks: Usage { rss: 16 * KIB, count: 1, ..Usage::default() },
        other_anon: Usage { rss: 5, ..Usage::default() },
        file: Usage { rss: 6, ..Usage::default() },
        shared: Usage { rss: 7, ..Usage::default() },
        ..MemoryPicture::default()
    };
    let delta = now.since(&baseline);
    let expected = MemoryDelta {
        rss: 20 * MIB as i64,
        pss: MIB as i64,
        uss: MIB as i64,
        swap: -4 * MIB as i64,
        writable_private: 2 * MIB as i64,
        threads: -2,
        heap_rss: 20 * MIB as i64,
        thread_stacks_rss: -8 * KIB as i64,
        thread_stacks_count: -2,
        other_anon_rss: 5,
        file_rss: 6,
        shared_rss: 7,
    };
    assert_eq!(delta, expected);
    assert_eq!(baseline.since(&baseline), MemoryDelta::default());
}

/// Check that the JSON field names are the documented snake_case ones.
#[test]
fn json_field_names() {
    let picture = serde_json::to_value(MemoryPicture::default()).expect("picture serializes");
    for key in [
        "rss",
        "pss",
        "uss",
        "swap",
        "writable_private",
        "threads",
        "heap",
        "thread_stacks",
        "main_stack",
        "other_anon",
        "file",
        "shared",
    ] {
        assert!(picture.get(key).is_some(), "{key} missing from {picture}");
    }
    for key in ["size", "rss", "pss", "uss", "swap", "count"] {
        assert!(picture["heap"].get(key).is_some(), "heap.{key} missing from {picture}");
    }
    let delta = serde_json::to_value(MemoryDelta::default()).expect("delta serializes");
    for key in [
        "heap_rss",
        "thread_stacks_rss",
        "thread_stacks_count",
        "other_anon_rss",
        "file_rss",
        "shared_rss",
    ] {
        assert!(delta.get(key).is_some(), "{key} missing from {delta}");
    }
}

//! Where reports go besides the terminal: collapsed stacks, a flame graph,
//! a pprof profile read by `go tool pprof`, a push to a Pyroscope-shaped
//! server, a diff of two runs; and bcc memleak's -a, -t and --sort.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::TcpListener,
    path::Path,
    process::Command,
    sync::{Arc, Mutex, OnceLock},
    thread,
};

use leaktrace_report::pprof::Profile;
use leaktrace_tests::*;
use prost::Message as _;

/// One traced run of steady_leak with every file output, shared by the
/// tests that read those files.
struct Outputs {
    report: Report,
    dir: ScratchDir,
}

fn outputs() -> &'static Outputs {
    static OUTPUTS: OnceLock<Outputs> = OnceLock::new();
    OUTPUTS.get_or_init(|| {
        require_root();
        let dir = ScratchDir::new("outputs");
        let path = |name: &str| dir.0.join(name).to_str().unwrap().to_string();
        let (folded, svg, pprof) = (path("leak.folded"), path("leak.svg"), path("leak.pb.gz"));
        let args = ["--folded", &folded, "--svg", &svg, "--pprof", &pprof];
        let reports = trace_over_time_with("steady_leak", 4, &args);
        let report = final_report(&reports).clone();
        Outputs { report, dir }
    })
}

/// The final report's bytes at steady_leak_step.
fn leak_bytes(report: &Report) -> u64 {
    stack_by_first_frame(report, "steady_leak_step")
        .unwrap_or_else(|| panic!("no steady_leak_step stack: {}", json(report)))
        .bytes
}

fn read_profile(path: &Path) -> Profile {
    let mut bytes = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_end(&mut bytes)
        .unwrap_or_else(|err| panic!("{} is not gzip: {err}", path.display()));
    Profile::decode(bytes.as_slice())
        .unwrap_or_else(|err| panic!("{} is not a pprof profile: {err}", path.display()))
}

/// `go tool pprof -top` of a profile, bytes in B.
fn go_pprof_top(path: &Path) -> String {
    let output = Command::new("go")
        .args(["tool", "pprof", "-top", "-sample_index=inuse_space", "-unit=B", "-symbolize=none"])
        .arg(path)
        .env("HOME", std::env::temp_dir())
        .output()
        .expect("go is installed by the test set-up (golang-go)");
    assert!(
        output.status.success(),
        "go tool pprof failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The first entry of `go tool pprof -top`: (flat bytes, name).
fn top_entry(top: &str) -> (u64, String) {
    let line = top
        .lines()
        .skip_while(|line| !line.trim_start().starts_with("flat"))
        .nth(1)
        .unwrap_or_else(|| panic!("no entries in:\n{top}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    let flat = words[0].trim_end_matches('B').parse().unwrap_or_else(|_| panic!("{line}"));
    (flat, words[words.len() - 1].to_string())
}

/// Check that every collapsed line parses (frames, a space, a count) and
/// that the leaking function's line carries its bytes.
#[test]
fn folded_lines_parse() {
    let outputs = outputs();
    let text = std::fs::read_to_string(outputs.dir.0.join("leak.folded")).unwrap();
    assert!(!text.trim().is_empty(), "empty folded file");
    for line in text.lines() {
        let (stack, count) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no count: {line}"));
        assert!(count.parse::<u64>().is_ok(), "bad count in {line:?}");
        assert!(!stack.contains(char::is_whitespace), "whitespace in frames: {line:?}");
        assert!(stack.split(';').all(|frame| !frame.is_empty()), "empty frame: {line:?}");
    }
    let leak = text
        .lines()
        .find(|line| line.rsplit_once(' ').unwrap().0.ends_with(";steady_leak_step"))
        .unwrap_or_else(|| panic!("no line ends at steady_leak_step:\n{text}"));
    let bytes: u64 = leak.rsplit_once(' ').unwrap().1.parse().unwrap();
    assert_eq!(bytes, leak_bytes(&outputs.report), "{leak}");
    assert!(leak.starts_with("_start;"), "not outermost first: {leak}");
}

/// Check that the flame graph is well-formed XML naming the leak.
#[test]
fn svg_is_xml_naming_the_leak() {
    let outputs = outputs();
    let svg = std::fs::read_to_string(outputs.dir.0.join("leak.svg")).unwrap();
    let mut reader = quick_xml::Reader::from_str(&svg);
    let mut depth = 0i64;
    loop {
        match reader.read_event() {
            Ok(quick_xml::events::Event::Start(_)) => depth += 1,
            Ok(quick_xml::events::Event::End(_)) => depth -= 1,
            Ok(quick_xml::events::Event::Eof) => break,
            Ok(_) => {}
            Err(err) => panic!("the SVG is not well-formed XML: {err}"),
        }
        assert!(depth >= 0, "an end tag without its start");
    }
    assert_eq!(depth, 0, "unclosed elements");
    assert!(svg.contains("steady_leak_step"), "the SVG does not name steady_leak_step");
    assert!(svg.contains("growing"), "the growing stack does not stand out");
}

/// Check that `go tool pprof -top -sample_index=inuse_space` puts the leak
/// first, with its bytes.
#[test]
fn pprof_read_by_go_tool() {
    let outputs = outputs();
    let top = go_pprof_top(&outputs.dir.0.join("leak.pb.gz"));
    let (flat, name) = top_entry(&top);
    assert_eq!(name, "steady_leak_step", "{top}");
    assert_eq!(flat, leak_bytes(&outputs.report), "{top}");
}

/// Check the profile's shape decoded here: sample types, an inlined call
/// as two Lines of one Location (the inlined function first, its caller
/// last), and the executable's mapping with its build id.
#[test]
fn pprof_inline_lines_and_build_ids() {
    require_root();
    let dir = ScratchDir::new("pprof-inline");
    let path = dir.0.join("inlined.pb.gz");
    let report = trace_fixture("unwind_inlined", &[], &["--pprof", path.to_str().unwrap()]);
    let profile = read_profile(&path);
    let types: Vec<(&str, &str)> = profile
        .sample_type
        .iter()
        .map(|value| (profile.string(value.r#type), profile.string(value.unit)))
        .collect();
    assert_eq!(types[..2], [("inuse_space", "bytes"), ("inuse_objects", "count")]);
    let name = |id: u64| {
        let function = profile.function.iter().find(|f| f.id == id).expect("function");
        profile.string(function.name).to_string()
    };
    let inlined = profile
        .location
        .iter()
        .find(|location| location.line.len() >= 2)
        .unwrap_or_else(|| panic!("no location with inlined lines; report: {}", json(&report)));
    let names: Vec<String> = inlined.line.iter().map(|line| name(line.function_id)).collect();
    assert_eq!(names, ["aligned_block", "main"], "inline lines out of order");
    let binary = fixture_path("unwind_inlined");
    let mapping = profile
        .mapping
        .iter()
        .find(|mapping| profile.string(mapping.filename).ends_with("/unwind_inlined"))
        .unwrap_or_else(|| panic!("no mapping for {}", binary.display()));
    let build_id = profile.string(mapping.build_id);
    let readelf = Command::new("readelf").arg("-n").arg(&binary).output().unwrap();
    let notes = String::from_utf8_lossy(&readelf.stdout);
    assert!(
        !build_id.is_empty() && notes.contains(build_id),
        "build id {build_id:?} not in:\n{notes}"
    );
}

/// Each request the test server received: "METHOD target", and its body.
type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A minimal HTTP server on 127.0.0.1 that keeps each request's target and
/// body and answers 200.
fn ingest_server() -> (u16, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let kept = Arc::clone(&requests);
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            reader.read_line(&mut request_line).unwrap();
            let mut length = 0usize;
            loop {
                let mut header = String::new();
                reader.read_line(&mut header).unwrap();
                if header.trim().is_empty() {
                    break;
                }
                if let Some((name, value)) = header.split_once(':') {
                    if name.eq_ignore_ascii_case("content-length") {
                        length = value.trim().parse().unwrap();
                    }
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let target = request_line.split_whitespace().nth(1).unwrap_or_default().to_string();
            kept.lock().unwrap().push((format!("{} {target}", &request_line[..4]), body));
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    (port, requests)
}

/// Check that --push sends each report to /ingest as pprof, named after the
/// process with its pid and host, with from/until, a body go tool pprof reads.
#[test]
fn push_to_ingest() {
    require_root();
    let (port, requests) = ingest_server();
    let url = format!("http://127.0.0.1:{port}");
    let reports = trace_over_time_with("steady_leak", 3, &["--push", &url]);
    let report = final_report(&reports);
    let requests = requests.lock().unwrap();
    assert_eq!(requests.len(), 3, "one push per report");
    let (target, body) = requests.last().unwrap();
    assert!(target.starts_with("POST /ingest?"), "{target}");
    let pid = report.pid;
    for part in
        ["format=pprof", "from=", "until=", &format!("pid%3D{pid}"), "name=leaktrace.steady_leak"]
    {
        assert!(target.contains(part), "{part} missing from {target}");
    }
    let dir = ScratchDir::new("push");
    let path = dir.0.join("pushed.pb.gz");
    std::fs::write(&path, body).unwrap();
    let (_, name) = top_entry(&go_pprof_top(&path));
    assert_eq!(name, "steady_leak_step");
    assert_eq!(report.push.map(|push| (push.sent, push.failed)), Some((3, 0)), "{}", json(report));
}

/// Check that a server that is down does not stop tracing: every report
/// comes, the failures are said on stderr and counted.
#[test]
fn push_to_nothing_keeps_tracing() {
    require_root();
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut fixture = Fixture::start("steady_leak", &[]);
    let url = format!("http://127.0.0.1:{port}");
    let mut tracer = Tracer::trace_pid(fixture.pid(), 1, 3, &["--push", &url]);
    tracer.wait_attached();
    fixture.go();
    fixture.wait_ready();
    let finished = tracer.finish();
    let reports = finished.reports();
    assert_eq!(reports.len(), 3, "tracing stopped: {}", finished.stderr);
    assert!(finished.stderr.contains("push to"), "no failure said:\n{}", finished.stderr);
    let report = final_report(&reports);
    assert_eq!(report.push.map(|push| push.failed), Some(3), "{}", json(report));
}

/// Run steady_leak for `seconds` reports a second apart, its --json output
/// saved to `path`.
fn save_run(path: &Path, seconds: u32) {
    let mut fixture = Fixture::start("steady_leak", &[]);
    let mut tracer = Tracer::trace_pid(fixture.pid(), 1, seconds, &["--top", "1000"]);
    tracer.wait_attached();
    fixture.go();
    fixture.wait_ready();
    let finished = tracer.finish();
    finished.reports();
    std::fs::write(path, &finished.stdout).unwrap();
}

/// Check that a diff of a 3 s and an 8 s run of one leak shows the leaking
/// stack grown (matched across the runs' different addresses) and the
/// churned one not, and that files that are not leaktrace output get one
/// line and a non-zero exit.
#[test]
fn diff_of_two_runs() {
    require_root();
    let dir = ScratchDir::new("diff");
    let (before, after) = (dir.0.join("before.json"), dir.0.join("after.json"));
    save_run(&before, 3);
    save_run(&after, 8);
    let finished =
        run_tracer(&["diff", "--json", before.to_str().unwrap(), after.to_str().unwrap()]);
    let diff = final_report(&finished.reports()).clone();
    assert_eq!(diff.kind, RecordKind::Diff, "{}", json(&diff));
    let leak = stack_by_first_frame(&diff, "steady_leak_step")
        .unwrap_or_else(|| panic!("no steady_leak_step in the diff: {}", json(&diff)));
    let delta = leak.delta.unwrap_or_else(|| panic!("no delta: {}", json(&diff)));
    assert!(
        delta.bytes_before > 0 && delta.bytes > 0,
        "the leak did not match or grow: {}",
        json(&diff)
    );
    assert_eq!(
        diff.stacks[0].first_symbol(),
        Some("steady_leak_step"),
        "growth first: {}",
        json(&diff)
    );
    let churn = diff.stacks.iter().filter(|stack| has_symbol(&stack.frames, "steady_churn"));
    assert!(
        churn.clone().all(|stack| stack.delta.is_some_and(|d| d.bytes <= 0)),
        "{}",
        json(&diff)
    );
    let text = run_tracer(&["diff", before.to_str().unwrap(), after.to_str().unwrap()]);
    assert!(text.status.success() && text.stdout.contains("steady_leak_step"), "{}", text.stdout);

    let not_json = dir.0.join("notes.txt");
    std::fs::write(&not_json, "{ this is not a report }\n").unwrap();
    let bad = run_tracer(&["diff", before.to_str().unwrap(), not_json.to_str().unwrap()]);
    assert_clean_error(&bad, "not leaktrace --json output");
    assert_clean_error(
        &run_tracer(&["diff", "/nonexistent.json", before.to_str().unwrap()]),
        "cannot open",
    );
}

/// Check -a: the small leak's outstanding allocations listed (at most 10),
/// each of 16 bytes, older than --older, while the stack counts all 500.
#[test]
fn show_allocs_lists_outstanding_blocks() {
    require_root();
    let report = trace_fixture("sort_leak", &[], &["-a"]);
    let stack = stack_by_first_frame(&report, "small_many")
        .unwrap_or_else(|| panic!("no small_many stack: {}", json(&report)));
    assert_eq!(stack.allocations, 500, "{}", json(&report));
    assert_eq!(stack.allocs.len(), 10, "{}", json(&report));
    for alloc in &stack.allocs {
        assert_eq!(alloc.size, 16);
        assert!(alloc.address != 0 && alloc.age_ms >= report.older_ms, "{alloc:?}");
    }
    let big = stack_by_first_frame(&report, "big_few").expect("big_few");
    assert_eq!(big.allocs.len(), 2, "{}", json(&report));
}

/// Check --sort: by size big_few comes first, by count small_many.
#[test]
fn sort_by_size_or_count() {
    require_root();
    let first = |extra: &[&str]| {
        let report = trace_fixture("sort_leak", &[], extra);
        report.stacks.first().and_then(|stack| stack.first_symbol()).map(str::to_string)
    };
    assert_eq!(first(&["--sort", "size"]).as_deref(), Some("big_few"));
    assert_eq!(first(&["--sort", "count"]).as_deref(), Some("small_many"));
}

/// Check -t: a line per allocation and free of the target on stderr, with
/// the leak's 16-byte blocks among them.
#[test]
fn trace_prints_events() {
    require_root();
    let mut fixture = Fixture::start("sort_leak", &[]);
    let mut tracer = Tracer::trace_pid(fixture.pid(), 1, 2, &["-t"]);
    tracer.wait_attached();
    fixture.go();
    fixture.wait_ready();
    let finished = tracer.finish();
    finished.reports();
    let allocs = finished.stderr.lines().filter(|line| line.starts_with("trace: alloc ")).count();
    assert!(allocs >= 502, "{allocs} alloc lines:\n{}", finished.stderr);
    assert!(finished.stderr.contains("size=16 addr=0x"), "{}", finished.stderr);
}

/// Check with `go tool pprof -raw` that functions keep their full names
/// (two instantiations of one template stay apart) and that every
/// Location's address lies in its Mapping's range, a real one with its
/// file offset, so that a server can symbolize from the build id.
#[test]
fn pprof_raw_full_names_and_mapping_ranges() {
    require_root();
    let dir = ScratchDir::new("pprof-raw");
    let path = dir.0.join("template.pb.gz");
    let report = trace_fixture("cpp_template", &[], &["--pprof", path.to_str().unwrap()]);
    let output = Command::new("go")
        .args(["tool", "pprof", "-raw"])
        .arg(&path)
        .env("HOME", std::env::temp_dir())
        .output()
        .expect("go is installed by the test set-up (golang-go)");
    let raw = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    for name in ["Ledger<int>::append(int)", "Ledger<double>::append(double)"] {
        assert!(raw.contains(name), "{name} not in the profile:\n{raw}\n{}", json(&report));
    }
    // "1: 0x55d0c2a49000/0x55d0c2a4a000/0x1000 /path/bin buildid [FN]..."
    // The lines of a section: from its title to the next title.
    let section = |title: &str| -> Vec<String> {
        raw.lines()
            .skip_while(|line| line.trim() != title)
            .skip(1)
            .take_while(|line| line.starts_with(' ') || line.contains(": 0x"))
            .map(str::to_string)
            .collect()
    };
    let hex = |text: &str| u64::from_str_radix(text.trim_start_matches("0x"), 16).unwrap();
    let mut ranges = std::collections::HashMap::new();
    for line in section("Mappings") {
        let Some((id, rest)) = line.trim().split_once(": ") else { continue };
        let bounds: Vec<&str> = rest.split_whitespace().next().unwrap_or("").split('/').collect();
        if bounds.len() == 3 {
            ranges.insert(id.to_string(), (hex(bounds[0]), hex(bounds[1])));
        }
    }
    let binary = ranges.values().filter(|&&(start, limit)| start > 0 && limit > start).count();
    assert!(binary > 0, "no Mapping with a range:\n{raw}");
    let mut checked = 0;
    for line in section("Locations") {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (Some(address), Some(mapping)) = (
            words.iter().find(|word| word.starts_with("0x")),
            words.iter().find_map(|word| word.strip_prefix("M=")),
        ) else {
            continue;
        };
        let &(start, limit) = ranges.get(mapping).unwrap_or_else(|| panic!("no mapping {mapping}"));
        let address = hex(address);
        assert!(start <= address && address < limit, "{line}: not in {start:#x}-{limit:#x}\n{raw}");
        checked += 1;
    }
    assert!(checked > 0, "no location read:\n{raw}");
    // The mangled name is the function's system_name.
    let profile = read_profile(&path);
    let system_name = profile
        .function
        .iter()
        .find(|function| profile.string(function.name) == "Ledger<int>::append(int)")
        .map(|function| profile.string(function.system_name).to_string());
    assert_eq!(system_name.as_deref(), Some("_ZN6LedgerIiE6appendEi"), "{raw}");
}

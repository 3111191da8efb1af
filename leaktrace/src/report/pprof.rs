//! The report as a gzipped pprof profile (`--pprof`, `--push`): sample
//! types `inuse_space/bytes`, `inuse_objects/count` and `growth/bytes`
//! (bytes a second: pprof has no rate unit, so the type's name says it),
//! one Location per address with a Line per frame (inlined calls first, the
//! function they were inlined into last), one Mapping per module with its
//! file name and build id.

use std::{
    collections::HashMap,
    io::{self, Write},
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

use flate2::{write::GzEncoder, Compression};
use leaktrace_report::{
    pprof::{Function, Label, Line, Location, Mapping, Profile, Sample, ValueType},
    Frame, MappingReport, Report,
};
use prost::Message as _;

use crate::{elf::ElfFile, proc::through_root};

/// Build ids by module path, read once.
#[derive(Default)]
pub struct BuildIds {
    known: HashMap<String, Option<String>>,
}

impl BuildIds {
    fn get(&mut self, pid: u32, module: &str) -> Option<String> {
        self.known
            .entry(module.to_string())
            .or_insert_with(|| {
                if module.starts_with('[') {
                    return None;
                }
                let path = Path::new(module);
                let inside = through_root(pid, path);
                let elf = ElfFile::open(&inside).or_else(|_| ElfFile::open(path)).ok()?;
                elf.build_id()
            })
            .clone()
    }
}

/// Interns strings, functions, locations and mappings as pprof wants them.
struct Builder<'a> {
    profile: Profile,
    strings: HashMap<String, i64>,
    functions: HashMap<(String, String), u64>,
    locations: HashMap<(u64, String), u64>,
    mappings: HashMap<String, u64>,
    /// The target's mappings (from the report), and their ids once made.
    ranges: &'a [MappingReport],
    range_ids: HashMap<usize, u64>,
    build_ids: &'a mut BuildIds,
    pid: u32,
}

impl Builder<'_> {
    fn string(&mut self, text: &str) -> i64 {
        if let Some(&index) = self.strings.get(text) {
            return index;
        }
        let index = self.profile.string_table.len() as i64;
        self.profile.string_table.push(text.to_string());
        self.strings.insert(text.to_string(), index);
        index
    }

    /// The Mapping of `address`: its real range and file offset, so that a
    /// server (pprof, Pyroscope, Parca) can symbolize from the build id; a
    /// module's mapping without a range when the report has none for it.
    fn mapping_of(&mut self, address: u64, module: &str) -> u64 {
        let Some(index) =
            self.ranges.iter().position(|range| range.start <= address && address < range.end)
        else {
            return self.mapping(module);
        };
        if let Some(&id) = self.range_ids.get(&index) {
            return id;
        }
        let range = &self.ranges[index];
        let id = self.profile.mapping.len() as u64 + 1;
        let build_id = self.build_ids.get(self.pid, &range.path).unwrap_or_default();
        let mapping = Mapping {
            id,
            memory_start: range.start,
            memory_limit: range.end,
            file_offset: range.offset,
            filename: self.string(&range.path),
            build_id: self.string(&build_id),
            has_functions: true,
            has_filenames: true,
            has_line_numbers: true,
            has_inline_frames: true,
        };
        self.profile.mapping.push(mapping);
        self.range_ids.insert(index, id);
        id
    }

    fn mapping(&mut self, module: &str) -> u64 {
        if let Some(&id) = self.mappings.get(module) {
            return id;
        }
        let id = self.profile.mapping.len() as u64 + 1;
        let build_id = self.build_ids.get(self.pid, module).unwrap_or_default();
        let mapping = Mapping {
            id,
            filename: self.string(module),
            build_id: self.string(&build_id),
            has_functions: true,
            has_filenames: true,
            has_line_numbers: true,
            has_inline_frames: true,
            ..Mapping::default()
        };
        self.profile.mapping.push(mapping);
        self.mappings.insert(module.to_string(), id);
        id
    }

    fn function(&mut self, frame: &Frame) -> u64 {
        let name = frame.name();
        let file = frame.file.clone().unwrap_or_default();
        if let Some(&id) = self.functions.get(&(name.clone(), file.clone())) {
            return id;
        }
        let id = self.profile.function.len() as u64 + 1;
        let system_name = frame.mangled.clone().unwrap_or_else(|| name.clone());
        let function = Function {
            id,
            name: self.string(&name),
            system_name: self.string(&system_name),
            filename: self.string(&file),
            start_line: 0,
        };
        self.profile.function.push(function);
        self.functions.insert((name, file), id);
        id
    }

    /// The location of the frames at one address (inlined ones first).
    fn location(&mut self, frames: &[Frame]) -> u64 {
        let address = frames[0].address;
        let module = frames.last().and_then(|frame| frame.module.clone()).unwrap_or_default();
        if let Some(&id) = self.locations.get(&(address, module.clone())) {
            return id;
        }
        let id = self.profile.location.len() as u64 + 1;
        let mapping_id = if module.is_empty() { 0 } else { self.mapping_of(address, &module) };
        let line = frames
            .iter()
            .map(|frame| Line {
                function_id: self.function(frame),
                line: i64::from(frame.line.unwrap_or(0)),
                column: 0,
            })
            .collect();
        self.profile.location.push(Location { id, mapping_id, address, line, is_folded: false });
        self.locations.insert((address, module), id);
        id
    }

    fn label(&mut self, key: &str, value: &str) -> Label {
        Label { key: self.string(key), str: self.string(value), num: 0, num_unit: 0 }
    }
}

/// The report's stacks as a profile.
pub fn profile(report: &Report, build_ids: &mut BuildIds) -> Profile {
    let mut builder = Builder {
        profile: Profile { string_table: vec![String::new()], ..Profile::default() },
        strings: HashMap::from([(String::new(), 0)]),
        functions: HashMap::new(),
        locations: HashMap::new(),
        mappings: HashMap::new(),
        ranges: &report.mappings,
        range_ids: HashMap::new(),
        build_ids,
        pid: report.pid,
    };
    let types = [("inuse_space", "bytes"), ("inuse_objects", "count"), ("growth", "bytes")];
    for (kind, unit) in types {
        let value_type = ValueType { r#type: builder.string(kind), unit: builder.string(unit) };
        builder.profile.sample_type.push(value_type);
    }
    builder.profile.default_sample_type = builder.string("inuse_space");
    for stack in &report.stacks {
        // Frames at one address are consecutive: the inlined ones, then
        // the function they were inlined into.
        let mut location_id = Vec::new();
        for frames in stack.frames.chunk_by(|a, b| a.address == b.address && a.inlined) {
            location_id.push(builder.location(frames));
        }
        let mut label = Vec::new();
        if let Some(growth) = stack.growth {
            label.push(builder.label("trend", growth.trend.as_str()));
        }
        if let Some(kind) = stack.kind {
            label.push(builder.label("kind", kind.name()));
        }
        if let Some(api) = stack.api {
            label.push(builder.label("api", api.as_str()));
        }
        if let Some(cache) = &stack.cache {
            label.push(builder.label("cache", cache));
        }
        let growth = stack.growth.map_or(0.0, |growth| growth.bytes_per_second.max(0.0));
        builder.profile.sample.push(Sample {
            location_id,
            value: vec![stack.bytes as i64, stack.allocations as i64, growth.round() as i64],
            label,
        });
    }
    builder.profile.time_nanos = humantime::parse_rfc3339(&report.time)
        .unwrap_or_else(|_| SystemTime::now())
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos() as i64);
    builder.profile
}

/// The profile, serialized and gzipped as pprof files are.
pub fn gzipped(profile: &Profile) -> io::Result<Vec<u8>> {
    let mut encoder = GzEncoder::new(Vec::new(), Compression::default());
    encoder.write_all(&profile.encode_to_vec())?;
    encoder.finish()
}

//! The `bpf()` syscall, for what aya 0.14 does not do: loading programs
//! with an attach type and making `uprobe_multi` links (`attach/multi.rs`),
//! and reading a map in batches (the collector reads the live allocations
//! of the stacks a report shows).

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
};

use aya::{maps::Map, Pod};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Call `bpf(command, attr)`.
pub fn bpf<T>(command: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a repr(C) prefix of `union bpf_attr` for `command`,
    // its pointers valid for the call; the kernel reads no further than
    // the size given.
    let ret = unsafe {
        libc::syscall(libc::SYS_bpf, command, attr as *mut T, std::mem::size_of::<T>() as u32)
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Call a `bpf()` command that returns a new file descriptor.
pub fn bpf_fd<T>(command: libc::c_long, attr: &mut T) -> io::Result<OwnedFd> {
    let fd = bpf(command, attr)?;
    // SAFETY: the command returned a new file descriptor, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The file descriptor of a map aya made.
pub fn map_fd(map: &Map) -> RawFd {
    let data = match map {
        Map::Array(data)
        | Map::ArrayOfMaps(data)
        | Map::BloomFilter(data)
        | Map::CgroupArray(data)
        | Map::CgroupStorage(data)
        | Map::CgrpStorage(data)
        | Map::CpuMap(data)
        | Map::DevMap(data)
        | Map::DevMapHash(data)
        | Map::HashMap(data)
        | Map::HashOfMaps(data)
        | Map::InodeStorage(data)
        | Map::LpmTrie(data)
        | Map::LruHashMap(data)
        | Map::PerCpuArray(data)
        | Map::PerCpuCgroupStorage(data)
        | Map::PerCpuHashMap(data)
        | Map::PerCpuLruHashMap(data)
        | Map::PerfEventArray(data)
        | Map::ProgramArray(data)
        | Map::Queue(data)
        | Map::ReusePortSockArray(data)
        | Map::RingBuf(data)
        | Map::SockHash(data)
        | Map::SockMap(data)
        | Map::SkStorage(data)
        | Map::Stack(data)
        | Map::StackTraceMap(data)
        | Map::Unsupported(data)
        | Map::XskMap(data) => data,
    };
    data.fd().as_fd().as_raw_fd()
}

/// `union bpf_attr` for the BPF_MAP_*_BATCH commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const _: () = assert!(std::mem::size_of::<BatchAttr>() == 56);

/// Entries fetched per `BPF_MAP_LOOKUP_BATCH` call.
const BATCH: usize = 8192;

/// Every entry of a (not per-CPU) hash map or array, read `BATCH` at a
/// time: one syscall per batch where aya's iterator makes two per entry (a
/// million live allocations: ~2 s that way). Entries inserted or deleted
/// while it reads may be seen or not, as with any walk of a live map.
pub fn map_entries<K: Pod, V: Pod>(map: &Map) -> io::Result<Vec<(K, V)>> {
    let fd = map_fd(map);
    let mut entries = Vec::new();
    let mut keys: Vec<K> = Vec::with_capacity(BATCH);
    let mut values: Vec<V> = Vec::with_capacity(BATCH);
    // The batch token is a bucket index (a hash map) or a key (an array):
    // a u32 either way.
    let (mut token, mut next) = (0u64, 0u64);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { &raw mut token as u64 },
            out_batch: &raw mut next as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let done = match result {
            Ok(_) => false,
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => true,
            Err(err) => return Err(err),
        };
        let count = (attr.count as usize).min(BATCH);
        // SAFETY: the kernel wrote `count` keys and values (plain old data)
        // into the buffers, whose capacity is BATCH.
        unsafe {
            keys.set_len(count);
            values.set_len(count);
        }
        entries.extend(keys.drain(..).zip(values.drain(..)));
        if done {
            return Ok(entries);
        }
        token = next;
        first = false;
    }
}

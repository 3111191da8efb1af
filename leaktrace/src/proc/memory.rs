//! Reads a process's own memory picture from /proc: RSS, PSS, USS and
//! swap, split by kind of mapping ([`super::classify`]), so a leak can be
//! told from a cache and from allocator retention.

use anyhow::{Context as _, Result};
use leaktrace_report::MemoryPicture;
use procfs::process::MemoryMap;

use super::{classify::classify, maps, process, thread_count};

/// Readings a [`MemoryReader`] may take from its last walk of smaps before
/// it walks again anyway (PSS moves when other processes map or drop shared
/// pages, which the target's own counters do not show).
const MAX_REUSES: u32 = 9;

/// Reads a process's memory picture (/proc/PID/smaps and /proc/PID/task)
/// report after report. Reading
/// /proc/PID/smaps walks the target's page tables: with 1,000,000 small
/// blocks live (a ~100 MB heap) that walk was about half of leaktrace's CPU
/// while the target idled. So the walk is redone only when the process's
/// counters (/proc/PID/statm) or its mappings (/proc/PID/maps, no walk)
/// changed since the last one, and at least every [`MAX_REUSES`] + 1
/// readings.
pub struct MemoryReader {
    pid: u32,
    last: Option<Walked>,
}

/// The last walk of smaps and what the process looked like then.
struct Walked {
    counters: [u64; 5],
    maps: Vec<MemoryMap>,
    picture: MemoryPicture,
    reuses: u32,
}

impl MemoryReader {
    pub fn new(pid: u32) -> Self {
        Self { pid, last: None }
    }

    pub fn read(&mut self) -> Result<MemoryPicture> {
        let pid = self.pid;
        let process = process(pid)?;
        let statm = process.statm().with_context(|| format!("failed to read /proc/{pid}/statm"))?;
        let counters = [statm.size, statm.resident, statm.shared, statm.text, statm.data];
        let maps = maps(pid)?;
        let threads = thread_count(pid)?;
        if let Some(last) = &mut self.last {
            if last.counters == counters && last.maps == maps && last.reuses < MAX_REUSES {
                last.reuses += 1;
                return Ok(MemoryPicture { threads, ..last.picture.clone() });
            }
        }
        let smaps = process.smaps().with_context(|| format!("failed to read /proc/{pid}/smaps"))?;
        let mut picture = classify(&smaps.0);
        picture.threads = threads;
        self.last = Some(Walked { counters, maps, picture: picture.clone(), reuses: 0 });
        Ok(picture)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Check that a reading of an idle process reuses the last walk of
    /// smaps, and gives the same picture.
    #[test]
    fn idle_process_read_without_walking_again() {
        let mut idle = std::process::Command::new("sleep").arg("30").spawn().expect("sleep runs");
        std::thread::sleep(std::time::Duration::from_millis(100));
        let mut reader = MemoryReader::new(idle.id());
        let first = reader.read().expect("first reading");
        let second = reader.read().expect("second reading");
        let reuses = reader.last.as_ref().map(|last| last.reuses);
        let _ = idle.kill();
        let _ = idle.wait();
        assert!(first.rss > 0, "sleep has resident memory: {first:?}");
        assert_eq!(reuses, Some(1), "the second reading should reuse the first walk");
        assert_eq!(first, second);
    }

    /// Check that the test process reads itself: resident memory, a thread, a main stack.
    #[test]
    fn read_self() {
        let picture =
            MemoryReader::new(std::process::id()).read().expect("read own memory picture");
        assert!(picture.rss > 0, "no RSS: {picture:?}");
        assert!(picture.threads >= 1, "no threads: {picture:?}");
        assert_eq!(picture.main_stack.count, 1, "no [stack]: {picture:?}");
        assert!(picture.file.count > 0, "no file mappings: {picture:?}");
        assert!(picture.uss <= picture.rss && picture.pss <= picture.rss, "{picture:?}");
    }

    /// Check that a missing process fails with its /proc path in the message.
    #[test]
    fn read_missing_process() {
        // Above the kernel's PID_MAX_LIMIT (4 Mi), so never a live process.
        let err = MemoryReader::new(0x7fff_fff0).read().expect_err("no such process");
        assert!(format!("{err:#}").contains("failed to read /proc/2147483632"), "{err:#}");
    }
}

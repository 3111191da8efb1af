//! The memory section of a text report.

use std::io::{self, Write};

use leaktrace_report::{MemoryDelta, MemoryPicture, Usage};

use super::units::{human_bytes, human_bytes_signed};

/// Write the memory section of a text report: three lines indented with a tab.
///
/// The total RSS always shows its change since attach; the other changes
/// show only where they are not zero, so a steady process reads short.
pub fn write_memory(
    picture: &MemoryPicture,
    delta: &MemoryDelta,
    out: &mut impl Write,
) -> io::Result<()> {
    writeln!(
        out,
        "\tMemory: RSS {} ({} since attach), PSS {}, USS {}, swap {}{}; writable/private {}{}",
        human_bytes(picture.rss),
        human_bytes_signed(delta.rss),
        human_bytes(picture.pss),
        human_bytes(picture.uss),
        human_bytes(picture.swap),
        change(delta.swap),
        human_bytes(picture.writable_private),
        change(delta.writable_private),
    )?;
    writeln!(
        out,
        "\t  heap {}; main stack {}; thread stacks {} for {}{}; other anon {}",
        category(&picture.heap, delta.heap_rss, 0),
        category(&picture.main_stack, 0, 0),
        category(&picture.thread_stacks, delta.thread_stacks_rss, delta.thread_stacks_count),
        plural(picture.threads, "thread"),
        count_change(delta.threads),
        category(&picture.other_anon, delta.other_anon_rss, 0),
    )?;
    writeln!(
        out,
        "\t  file {}; shared {}",
        category(&picture.file, delta.file_rss, 0),
        category(&picture.shared, delta.shared_rss, 0),
    )
}

/// "176.0 MiB RSS (+170.0 MiB) in 9 mappings (+2)", changes only where not zero.
fn category(usage: &Usage, rss_delta: i64, count_delta: i64) -> String {
    let swap =
        if usage.swap > 0 { format!(" + {} swap", human_bytes(usage.swap)) } else { String::new() };
    format!(
        "{} RSS{}{} in {}{}",
        human_bytes(usage.rss),
        change(rss_delta),
        swap,
        plural(usage.count, "mapping"),
        count_change(count_delta),
    )
}

/// " (+1.5 MiB)", or nothing for no change.
fn change(delta: i64) -> String {
    if delta == 0 {
        String::new()
    } else {
        format!(" ({})", human_bytes_signed(delta))
    }
}

/// " (+2)", or nothing for no change.
fn count_change(delta: i64) -> String {
    if delta == 0 {
        String::new()
    } else {
        format!(" ({delta:+})")
    }
}

fn plural(count: u64, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    /// Check the text section's wording, with and without changes.
    #[test]
    fn text_lines() {
        let mut baseline = crate::proc::sample_picture();
        baseline.threads = 4;
        let mut now = baseline.clone();
        now.rss += 170 * MIB;
        now.heap.rss += 170 * MIB;
        now.swap += 4 * MIB;
        now.heap.swap += 4 * MIB;
        now.writable_private += 1024 * MIB;
        now.thread_stacks.count += 2;
        now.threads += 2;
        let mut out = Vec::new();
        write_memory(&now, &now.since(&baseline), &mut out).expect("write to a Vec");
        let text = String::from_utf8(out).expect("text is UTF-8");
        let expected =
            "\tMemory: RSS 237.2 MiB (+170.0 MiB since attach), PSS 67.2 MiB, USS 67.2 MiB, \
                        swap 4.0 MiB (+4.0 MiB); writable/private 1.1 GiB (+1.0 GiB)\n\
                        \t  heap 213.9 MiB RSS (+170.0 MiB) + 4.0 MiB swap in 5 mappings; \
                        main stack 20.0 KiB RSS in 1 mapping; \
                        thread stacks 24.0 KiB RSS in 5 mappings (+2) for 6 threads (+2); \
                        other anon 20.0 MiB RSS in 6 mappings\n\
                        \t  file 168.0 KiB RSS in 4 mappings; shared 3.0 MiB RSS in 3 mappings\n";
        assert_eq!(text, expected);

        let mut out = Vec::new();
        write_memory(&baseline, &MemoryDelta::default(), &mut out).expect("write to a Vec");
        let text = String::from_utf8(out).expect("text is UTF-8");
        let rest = text.replacen("(+0 bytes since attach)", "", 1);
        assert!(rest.len() < text.len(), "RSS change missing: {text}");
        assert!(!rest.contains("(+0") && !rest.contains("(-0"), "zero changes shown: {text}");
    }
}

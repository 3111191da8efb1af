//! Byte counts as people read them.

/// Bytes with a binary unit: "512 bytes", "12.0 KiB", "1.5 MiB".
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// A signed change with a binary unit: "+1.5 MiB", "-12.0 KiB", "+0 bytes".
pub fn human_bytes_signed(delta: i64) -> String {
    let sign = if delta < 0 { '-' } else { '+' };
    format!("{sign}{}", human_bytes(delta.unsigned_abs()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * KIB;

    /// Check byte formatting, unsigned and signed.
    #[test]
    fn bytes() {
        assert_eq!(human_bytes(512), "512 bytes");
        assert_eq!(human_bytes(12 * KIB), "12.0 KiB");
        assert_eq!(human_bytes(3 * MIB / 2), "1.5 MiB");
        assert_eq!(human_bytes_signed(3 * MIB as i64 / 2), "+1.5 MiB");
        assert_eq!(human_bytes_signed(-12 * KIB as i64), "-12.0 KiB");
        assert_eq!(human_bytes_signed(0), "+0 bytes");
        assert_eq!(human_bytes_signed(i64::MIN), format!("-{}", human_bytes(1 << 63)));
    }
}

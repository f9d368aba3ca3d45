//! Human-readable byte sizes.

pub use shardpress_engine::report_render::human;

/// Parses a byte size: a number with an optional unit, e.g. `512MiB`, `4GiB`, `1.5 GiB`,
/// `1000000`. Binary units (`KiB`, `MiB`, `GiB`, `TiB`, or Kubernetes' `Ki`, `Mi`, `Gi`,
/// `Ti`) count in 1024s, decimal ones (`kB`, `MB`, `GB`, `TB`, or `k`, `M`, `G`, `T`) in
/// 1000s; `B` or no unit means bytes. Units are case-insensitive. Fractions must come out
/// to whole bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number = number.replace('_', "");
    let unit = unit.trim();
    let bad = |why: &str| {
        format!("invalid size {text:?}: {why} (examples: 512MiB, 4GiB, 1.5GB, 1000000)")
    };
    if number.is_empty() {
        return Err(bad("expected a number"));
    }
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "m" | "mb" => 1_000_000,
        "g" | "gb" => 1_000_000_000,
        "t" | "tb" => 1_000_000_000_000,
        "ki" | "kib" => 1 << 10,
        "mi" | "mib" => 1 << 20,
        "gi" | "gib" => 1 << 30,
        "ti" | "tib" => 1 << 40,
        _ => return Err(bad(&format!("unknown unit {unit:?}"))),
    };
    if let Ok(whole) = number.parse::<u64>() {
        return whole
            .checked_mul(multiplier)
            .ok_or_else(|| bad("too large"));
    }
    // A fraction: exact enough for sizes well below 2^53 bytes, refused above.
    let value: f64 = number.parse().map_err(|_| bad("expected a number"))?;
    let bytes = value * multiplier as f64;
    if !bytes.is_finite() || bytes >= 9.0e15 {
        return Err(bad("too large"));
    }
    if bytes.fract() != 0.0 {
        return Err(bad("not a whole number of bytes"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::{human, parse_size};

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("4GiB"), Ok(4 << 30));
        assert_eq!(parse_size("4gib"), Ok(4 << 30));
        assert_eq!(parse_size("4Gi"), Ok(4 << 30));
        assert_eq!(parse_size("1000000"), Ok(1_000_000));
        assert_eq!(parse_size("1_000_000"), Ok(1_000_000));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size("2G"), Ok(2_000_000_000));
        assert_eq!(parse_size("64 KiB"), Ok(65_536));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size(" 10B "), Ok(10));
        assert_eq!(parse_size("0"), Ok(0));
    }

    #[test]
    fn refuses_bad_sizes() {
        for bad in [
            "",
            "GiB",
            "12XB",
            "-1GiB",
            "1.2.3MiB",
            "0.5B",
            "99999999999TiB",
            "1e3",
            "4 GiB extra",
        ] {
            let e = parse_size(bad).expect_err(bad);
            assert!(e.contains("invalid size"), "{bad}: {e}");
        }
        assert!(parse_size("3XB")
            .unwrap_err()
            .contains("unknown unit \"XB\""));
        assert!(parse_size("18446744073709551615KiB")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn formats() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(90_868_376), "86.7 MiB");
    }
}

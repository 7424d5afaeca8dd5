//! Sizes and tables for the CLI.

use pagewire::SessionStats;

/// Parse "4096", "64KiB", "256MiB", "1GiB" (also K/M/G and KB/MB/GB as binary units).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (bytes, or a number with KiB/MiB/GiB)"))?;
    let mul: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "'{s}': unknown size unit '{unit}' (use KiB, MiB, GiB)"
            ))
        }
    };
    n.checked_mul(mul)
        .ok_or_else(|| format!("'{s}' is too large"))
}

/// "256.0 MiB".
/// Memory this host can give a new process without swapping (MemAvailable of
/// /proc/meminfo), in bytes; `None` where it cannot be read.
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line
        .trim_start_matches("MemAvailable:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

fn row(out: &mut String, label: &str, a: String, b: Option<String>) {
    match b {
        Some(b) => out.push_str(&format!("  {label:<24} {a:>16} {b:>16}\n")),
        None => out.push_str(&format!("  {label:<24} {a:>16}\n")),
    }
}

fn rows(out: &mut String, s: &SessionStats, r: Option<&SessionStats>) {
    let f = |g: &dyn Fn(&SessionStats) -> String| (g(s), r.map(g));
    let mut add = |label: &str, g: &dyn Fn(&SessionStats) -> String| {
        let (a, b) = f(g);
        row(out, label, a, b);
    };
    add("memory", &|s| human_bytes(s.total.memory_bytes));
    add("on the wire", &|s| human_bytes(s.total.wire_bytes));
    add("wire / memory", &|s| format!("{:.3}", s.wire_ratio()));
    add("seconds", &|s| format!("{:.3}", s.seconds));
    add("GB/s of memory", &|s| format!("{:.2}", s.gbps()));
    add("GB/s on the wire", &|s| {
        format!("{:.2}", s.wire_rate() / 1e9)
    });
    add("CPU seconds", &|s| format!("{:.2}", s.total.cpu_seconds));
    add("CPU s / GiB", &|s| {
        let gib = s.total.memory_bytes as f64 / (1u64 << 30) as f64;
        if gib > 0.0 {
            format!("{:.2}", s.total.cpu_seconds / gib)
        } else {
            "-".into()
        }
    });
    add("pages: zero", &|s| s.total.pages_zero.to_string());
    add("  of which not read", &|s| {
        s.total.pages_zero_unread.to_string()
    });
    if s.total.pages_left_out > 0 {
        add("pages left out (never written)", &|s| {
            s.total.pages_left_out.to_string()
        });
    }
    add("pages: compressed", &|s| {
        s.total.pages_compressed.to_string()
    });
    add("pages: raw", &|s| s.total.pages_raw.to_string());
    add("  of which not tried", &|s| {
        s.total.pages_skipped.to_string()
    });
    if s.total.pages_raw_chosen > 0 {
        add("  raw by auto's choice", &|s| {
            s.total.pages_raw_chosen.to_string()
        });
    }
    add("  raw as incompressible", &|s| {
        s.total.pages_incompressible.to_string()
    });
    add("packets", &|s| s.total.packets.to_string());
    if s.total.jobs_hardware + s.total.jobs_software > 0 {
        add("jobs: hardware", &|s| s.total.jobs_hardware.to_string());
        add("jobs: software", &|s| s.total.jobs_software.to_string());
        add("jobs: busy retries", &|s| s.total.busy_retries.to_string());
        add("jobs: busy -> software", &|s| {
            s.total.busy_fallbacks.to_string()
        });
        add("jobs: failed -> raw", &|s| s.total.jobs_failed.to_string());
    }
}

/// Sender and receiver side by side.
pub fn summary_table(s: &SessionStats, r: &SessionStats) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "  {:<24} {:>16} {:>16}\n",
        "", "sender", "receiver"
    ));
    rows(&mut out, s, Some(r));
    out
}

/// One line per round: pages by kind, wire bytes, time.
pub fn rounds_table(rounds: &[SessionStats]) -> String {
    let mut out = format!(
        "  {:>5} {:>10} {:>10} {:>10} {:>10} {:>12} {:>9}\n",
        "round", "pages", "zero", "compressed", "raw", "wire", "seconds"
    );
    for (i, r) in rounds.iter().enumerate() {
        let t = &r.total;
        out.push_str(&format!(
            "  {:>5} {:>10} {:>10} {:>10} {:>10} {:>12} {:>9.3}\n",
            i + 1,
            t.pages_normal + t.pages_zero,
            t.pages_zero,
            t.pages_compressed,
            t.pages_raw,
            human_bytes(t.wire_bytes),
            r.seconds
        ));
    }
    out
}

/// One side.
pub fn side_table(label: &str, s: &SessionStats) -> String {
    let mut out = String::new();
    out.push_str(&format!("  {:<24} {:>16}\n", "", label));
    rows(&mut out, s, None);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("256MiB"), Ok(256 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2M"), Ok(2 << 20));
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999999GiB").is_err());
    }

    #[test]
    fn human() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(256 << 20), "256.0 MiB");
    }
}

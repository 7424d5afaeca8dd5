//! Shared helpers for pagewire's benchmark binaries: timing (medians of several runs), GB/s
//! figures, a plain-text table printer, the machine description, and `--json` output.
//!
//! Every figure the binaries print is the median of several runs, and every comparison is made
//! between candidates measured in the same run on the same pages (DESIGN.md §8).

use std::fmt::Write as _;
use std::hint::black_box;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Timings of several runs of the same work.
#[derive(Clone, Debug, Serialize)]
pub struct Timing {
    /// Median wall time of one run, in seconds.
    pub median_s: f64,
    /// Fastest run, in seconds.
    pub min_s: f64,
    /// Slowest run, in seconds.
    pub max_s: f64,
    /// Number of runs.
    pub runs: usize,
}

impl Timing {
    /// From individual run times (at least one).
    pub fn from_samples(samples: &[Duration]) -> Timing {
        let mut s: Vec<f64> = samples.iter().map(Duration::as_secs_f64).collect();
        s.sort_by(f64::total_cmp);
        let n = s.len();
        let median = match n {
            0 => f64::NAN,
            _ if n % 2 == 1 => s[n / 2],
            _ => (s[n / 2 - 1] + s[n / 2]) / 2.0,
        };
        Timing {
            median_s: median,
            min_s: s.first().copied().unwrap_or(f64::NAN),
            max_s: s.last().copied().unwrap_or(f64::NAN),
            runs: n,
        }
    }

    /// Median throughput for `bytes` of work per run, in GB/s (10^9 bytes per second).
    pub fn gbps(&self, bytes: u64) -> f64 {
        gbps(bytes, self.median_s)
    }

    /// Median time per item for `items` items per run, in microseconds.
    pub fn us_per(&self, items: u64) -> f64 {
        if items == 0 {
            return f64::NAN;
        }
        self.median_s * 1e6 / items as f64
    }

    /// (slowest - fastest) / median: how noisy the runs were.
    pub fn spread(&self) -> f64 {
        (self.max_s - self.min_s) / self.median_s
    }
}

/// Runs `f` `runs` times (at least once) and returns the timing and the last result. The result
/// goes through [`black_box`], so the work cannot be optimised away.
pub fn time_runs<T>(runs: usize, mut f: impl FnMut() -> T) -> (Timing, T) {
    let runs = runs.max(1);
    let mut samples = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs {
        let t = Instant::now();
        let r = black_box(f());
        samples.push(t.elapsed());
        last = Some(r);
    }
    match last {
        Some(r) => (Timing::from_samples(&samples), r),
        None => unreachable!("runs >= 1"),
    }
}

/// Median wall time of `runs` runs of `f`.
pub fn median_of<T>(runs: usize, f: impl FnMut() -> T) -> Duration {
    Duration::from_secs_f64(time_runs(runs, f).0.median_s)
}

/// Accumulates the samples of one figure when several candidates are timed in turn within the
/// same run (interleaving keeps a noisy neighbour from landing on one candidate only).
#[derive(Clone, Debug, Default)]
pub struct Samples(Vec<Duration>);

impl Samples {
    /// Times one run of `f`, records it, and returns the result.
    pub fn time<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let r = black_box(f());
        self.0.push(t.elapsed());
        r
    }

    /// The timing of the recorded runs.
    pub fn timing(&self) -> Timing {
        Timing::from_samples(&self.0)
    }
}

/// Bytes per second in GB/s (10^9 bytes per second).
pub fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

/// A GB/s figure with three significant digits ("0.172", "1.84", "12.3").
pub fn fmt_gbps(v: f64) -> String {
    fmt_sig(v, 3)
}

/// `v` with `digits` significant digits, without an exponent.
pub fn fmt_sig(v: f64, digits: usize) -> String {
    if !v.is_finite() {
        return "-".to_string();
    }
    if v == 0.0 {
        return "0".to_string();
    }
    let mag = v.abs().log10().floor() as i32;
    let decimals = (digits as i32 - 1 - mag).max(0) as usize;
    format!("{v:.decimals$}")
}

/// A ratio "a / b" as "1.84 ×".
pub fn fmt_times(v: f64) -> String {
    format!("{} ×", fmt_sig(v, 3))
}

/// A plain-text table with a header row; numbers are right-aligned, text left-aligned.
#[derive(Clone, Debug, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new<S: Into<String>>(headers: impl IntoIterator<Item = S>) -> Table {
        Table {
            headers: headers.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    /// Appends a row (missing cells print empty, extra cells are kept).
    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    /// The table as text, one line per row, columns separated by two spaces.
    pub fn render(&self) -> String {
        let cols = self
            .rows
            .iter()
            .map(Vec::len)
            .chain([self.headers.len()])
            .max()
            .unwrap_or(0);
        let cell = |row: &Vec<String>, i: usize| row.get(i).cloned().unwrap_or_default();
        let mut width = vec![0usize; cols];
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            for (i, w) in width.iter_mut().enumerate() {
                *w = (*w).max(cell(row, i).chars().count());
            }
        }
        let numeric = |s: &str| {
            s.chars()
                .next()
                .is_some_and(|c| c.is_ascii_digit() || c == '-' || c == '.')
        };
        let mut out = String::new();
        let line = |row: &Vec<String>, out: &mut String| {
            let mut l = String::new();
            for (i, w) in width.iter().enumerate() {
                let c = cell(row, i);
                let pad = w - c.chars().count();
                if i > 0 {
                    l.push_str("  ");
                }
                if numeric(&c) {
                    l.push_str(&" ".repeat(pad));
                    l.push_str(&c);
                } else {
                    l.push_str(&c);
                    l.push_str(&" ".repeat(pad));
                }
            }
            let _ = writeln!(out, "{}", l.trim_end());
        };
        line(&self.headers, &mut out);
        let rule: Vec<String> = width.iter().map(|w| "-".repeat(*w)).collect();
        line(&rule, &mut out);
        for row in &self.rows {
            line(row, &mut out);
        }
        out
    }

    /// The table as a Markdown table (for docs/benchmarks.md).
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "| {} |", self.headers.join(" | "));
        let _ = writeln!(
            out,
            "|{}",
            self.headers.iter().map(|_| "---|").collect::<String>()
        );
        for row in &self.rows {
            let _ = writeln!(out, "| {} |", row.join(" | "));
        }
        out
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render())
    }
}

/// What the figures were measured on.
#[derive(Clone, Debug, Serialize)]
pub struct Machine {
    /// Online CPUs (`nproc`).
    pub nproc: usize,
    /// `model name` from /proc/cpuinfo.
    pub cpu_model: String,
    /// Kernel release (`uname -r`).
    pub kernel: String,
}

impl Machine {
    /// Reads the description of this machine (fields it cannot read are "unknown").
    pub fn detect() -> Machine {
        let nproc = std::thread::available_parallelism().map_or(0, usize::from);
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".to_string());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".to_string());
        Machine {
            nproc,
            cpu_model,
            kernel,
        }
    }
}

impl std::fmt::Display for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} CPUs ({}), kernel {}",
            self.nproc, self.cpu_model, self.kernel
        )
    }
}

/// Command-line options every bench binary shares: `--json`, `--runs N`, `--mib N`.
#[derive(Clone, Debug)]
pub struct Options {
    /// Print one JSON object instead of tables.
    pub json: bool,
    /// Runs per figure (the median is reported).
    pub runs: usize,
    /// MiB of pages per page set.
    pub mib: usize,
}

impl Options {
    /// Parses the process arguments; `usage` is printed on `--help` or an unknown argument.
    pub fn from_args(default_runs: usize, default_mib: usize, usage: &str) -> Options {
        match Options::parse(std::env::args().skip(1), default_runs, default_mib) {
            Ok(Some(o)) => o,
            Ok(None) => {
                println!("{usage}");
                std::process::exit(0);
            }
            Err(e) => {
                eprintln!("error: {e}\n{usage}");
                std::process::exit(2);
            }
        }
    }

    /// Parses `args`; `Ok(None)` for `--help`.
    pub fn parse(
        args: impl IntoIterator<Item = String>,
        default_runs: usize,
        default_mib: usize,
    ) -> Result<Option<Options>, String> {
        let mut o = Options {
            json: false,
            runs: default_runs,
            mib: default_mib,
        };
        let mut args = args.into_iter();
        while let Some(a) = args.next() {
            let mut number = |name: &str| -> Result<usize, String> {
                args.next()
                    .and_then(|v| v.parse::<usize>().ok())
                    .filter(|&v| v > 0)
                    .ok_or_else(|| format!("{name} needs a positive number"))
            };
            match a.as_str() {
                "--json" => o.json = true,
                "--runs" => o.runs = number("--runs")?,
                "--mib" => o.mib = number("--mib")?,
                "-h" | "--help" => return Ok(None),
                other => return Err(format!("unknown argument '{other}'")),
            }
        }
        Ok(Some(o))
    }
}

/// Prints `value` as one line of JSON on stdout.
pub fn print_json<T: Serialize>(value: &T) {
    match serde_json::to_string(value) {
        Ok(s) => println!("{s}"),
        Err(e) => {
            eprintln!("error: cannot serialise the results: {e}");
            std::process::exit(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_odd_and_even() {
        let d = |ms| Duration::from_millis(ms);
        let t = Timing::from_samples(&[d(5), d(1), d(3)]);
        assert_eq!(t.median_s, 0.003);
        assert_eq!(t.min_s, 0.001);
        assert_eq!(t.max_s, 0.005);
        let t = Timing::from_samples(&[d(4), d(1), d(3), d(2)]);
        assert!((t.median_s - 0.0025).abs() < 1e-12);
        assert_eq!(t.runs, 4);
    }

    #[test]
    fn time_runs_runs_at_least_once() {
        let mut n = 0;
        let (t, last) = time_runs(0, || {
            n += 1;
            n
        });
        assert_eq!((t.runs, last), (1, 1));
    }

    #[test]
    fn formatting() {
        assert_eq!(fmt_gbps(0.17234), "0.172");
        assert_eq!(fmt_gbps(1.8449), "1.84");
        assert_eq!(fmt_gbps(12.34), "12.3");
        assert_eq!(fmt_gbps(123.4), "123");
        assert_eq!(fmt_gbps(f64::NAN), "-");
        assert_eq!(fmt_times(1.8), "1.80 ×");
        assert_eq!(gbps(2_000_000_000, 2.0), 1.0);
    }

    #[test]
    fn table_aligns() {
        let mut t = Table::new(["codec", "GB/s"]);
        t.row(["libdeflate L1", "0.5"]);
        t.row(["x", "12.25"]);
        let s = t.render();
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines[0], "codec          GB/s");
        assert_eq!(lines[2], "libdeflate L1    0.5");
        assert_eq!(lines[3], "x              12.25");
        assert!(t.markdown().starts_with("| codec | GB/s |\n|---|---|\n"));
    }

    #[test]
    fn options() {
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let o = Options::parse(args(&["--json", "--runs", "7"]), 5, 16)
            .expect("valid")
            .expect("not help");
        assert!(o.json);
        assert_eq!((o.runs, o.mib), (7, 16));
        assert!(Options::parse(args(&["--runs"]), 5, 16).is_err());
        assert!(Options::parse(args(&["--mib", "0"]), 5, 16).is_err());
        assert!(Options::parse(args(&["--bogus"]), 5, 16).is_err());
        assert!(Options::parse(args(&["--help"]), 5, 16)
            .expect("ok")
            .is_none());
    }
}

/// One loopback session's figures, as the engine benchmarks report them.
#[derive(Clone, Copy, Debug, Default)]
pub struct SessionRun {
    /// Wall seconds of the round (first page to the receiver's round-done).
    pub seconds: f64,
    /// CPU seconds of the sender's channel threads.
    pub send_cpu: f64,
    /// CPU seconds of the receiver's channel threads.
    pub recv_cpu: f64,
    /// Bytes on the wire.
    pub wire: u64,
}

/// Move `src` into `dst` (same layout) with one pagewire session over loopback configured by
/// `cfg` (a receiver with the settings both ends share), one round of every page.
pub fn loopback_session(
    src: &std::sync::Arc<pagewire::GuestRam>,
    dst: &std::sync::Arc<pagewire::GuestRam>,
    cfg: &pagewire::SenderConfig,
) -> SessionRun {
    let rcfg = pagewire::ReceiverConfig::for_sender(cfg);
    loopback_session_with(src, dst, cfg, rcfg)
}

/// [`loopback_session`] with the receiver's settings given.
pub fn loopback_session_with(
    src: &std::sync::Arc<pagewire::GuestRam>,
    dst: &std::sync::Arc<pagewire::GuestRam>,
    cfg: &pagewire::SenderConfig,
    rcfg: pagewire::ReceiverConfig,
) -> SessionRun {
    use pagewire::{ReceiveInto, Receiver, RoundPages, Sender};
    let mut r = Receiver::bind("127.0.0.1:0".parse().expect("addr"), rcfg).expect("bind");
    r.set_accept_timeout(Some(Duration::from_secs(30)));
    let addr = r.local_addr().expect("addr");
    let d = dst.clone();
    let rt = std::thread::spawn(move || r.serve(ReceiveInto::Memory(d)));
    let sizes: Vec<u64> = src.blocks().iter().map(|b| b.len() as u64).collect();
    let mut s = Sender::connect(addr, cfg.clone(), src.clone()).expect("connect");
    let round = s
        .send_round(RoundPages::all(&sizes, cfg.page_size, cfg.pages_per_packet))
        .expect("round");
    s.finish().expect("finish");
    let got = rt.join().expect("join").expect("serve");
    SessionRun {
        seconds: round.seconds,
        send_cpu: round.total.cpu_seconds,
        recv_cpu: got.stats.total.cpu_seconds,
        wire: round.total.wire_bytes,
    }
}

//! `pagewire kvm-demo`: live migration of a running KVM guest between two VMM processes,
//! with pagewire moving the memory. An example of embedding pagewire in a VMM; nothing in the
//! library knows about KVM (docs/kvm.md).
//!
//! - `kvm-demo source --connect ADDR`: boot the guest with dirty logging and hand it to
//!   pagewire's migration driver (`pagewire::Driver`), which sends round 1 (every page) while
//!   it runs, then a round per KVM dirty bitmap, throttles the guest if the rounds stop
//!   shrinking, and pauses it once the predicted downtime fits `--downtime-limit`; then the
//!   last dirty pages and the vCPU state go, and the session ends. Guest RAM is a vm-memory
//!   `GuestMemoryMmap`, handed to pagewire as it is.
//! - `kvm-demo dest --listen ADDR`: receive into the VM's own memory, restore the vCPU,
//!   resume the guest and check that it continued from where it was paused.
//! - `kvm-demo`: both, the destination as a child process of this one, over loopback.

mod dest;
mod guest;
mod source;
mod state;
mod vm;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use clap::{Args, Subcommand};
use pagewire::config::PostcopyCpus;
use pagewire::tls::TlsConfig;
use pagewire::Secret;
use pagewire::{CodecKind, Rate, ReceiverConfig, SenderConfig};
use serde_json::{json, Value};

use crate::format::{human_bytes, parse_size};
use guest::Layout;

type Res<T> = Result<T, String>;

/// `pagewire kvm-demo` arguments.
#[derive(Args, Debug)]
pub struct KvmArgs {
    #[command(subcommand)]
    role: Option<Role>,
    #[command(flatten)]
    opts: Opts,
}

#[derive(Subcommand, Debug)]
enum Role {
    /// The source VMM: boot the guest and migrate it, running, to a destination.
    Source {
        /// Destination address, host:port.
        #[arg(long)]
        connect: String,
    },
    /// The destination VMM: receive a guest, resume it and check that it continued.
    Dest {
        /// Address to listen on, host:port (port 0: any; the address is printed).
        #[arg(long)]
        listen: String,
        /// Give up if no source connects within this many seconds (default: wait).
        #[arg(long)]
        accept_timeout: Option<f64>,
        /// Without --secret-file, also accept sources that are not on loopback.
        #[arg(long)]
        insecure: bool,
    },
}

#[derive(Args, Debug, Clone)]
struct Opts {
    /// Guest memory (a multiple of 2 MiB; the same on both sides).
    #[arg(long, global = true, default_value = "64MiB")]
    memory: String,
    /// Pages the guest keeps rewriting (from 16 MiB into its memory).
    #[arg(long, global = true, default_value_t = 4096)]
    working_set: u64,
    /// Channel connections (source).
    #[arg(long, global = true, default_value_t = 2)]
    channels: u16,
    /// Codec (source): none (raw pages: the fastest on loopback), deflate, or auto
    /// (deflate).
    #[arg(long, global = true, default_value = "none")]
    codec: String,
    /// Most live rounds before giving up (source): a guest that has not converged by then
    /// keeps running on the source and the command fails.
    #[arg(long, global = true, default_value_t = 30)]
    max_rounds: u32,
    /// Downtime limit in ms (source): the driver pauses the guest once the predicted
    /// downtime of stopping fits in it.
    #[arg(long, global = true, default_value_t = 20.0)]
    downtime_limit: f64,
    /// Seconds the guest runs before the migration starts (source).
    #[arg(long, global = true, default_value_t = 0.2)]
    warmup: f64,
    /// Never throttle the guest (source). By default two rounds in a row that leave a dirty
    /// set of at least half of what they sent raise a throttle (20 %, 30 %, ... 99 % of the
    /// time held back), as QEMU's auto-converge does.
    #[arg(long, global = true)]
    no_auto_converge: bool,
    /// Before each dirty-log collection, wait until the guest has rewritten its working set
    /// this many times since the previous one (source; 0: never wait). Makes each round's
    /// dirty set the guest's whole working set whatever else loads the host (tests use it).
    #[arg(long, global = true, default_value_t = 0)]
    min_passes_per_round: u64,
    /// Post-copy (source): after --precopy-rounds live rounds, pause the guest, send its vCPU
    /// state and let it resume on the destination at once; the pages it lacks follow, those
    /// it touches first.
    #[arg(long, global = true)]
    postcopy: bool,
    /// Live pre-copy rounds before post-copy (0: pure post-copy).
    #[arg(long, global = true, default_value_t = 1)]
    precopy_rounds: u32,
    /// Post-copy as the driver's fallback (source): pre-copy as usual (downtime limit,
    /// auto-converge), but where the driver would give up at --max-rounds it switches to
    /// post-copy instead. A guest that converges ends with a paused round as without it.
    #[arg(long, global = true, conflicts_with = "postcopy")]
    postcopy_fallback: bool,
    /// Cap on the session's wire rate (source), e.g. 160mbit, 20MB/s, or bytes per second
    /// (default: no cap): a link slower than the guest dirties its memory. Pre-copy and
    /// post-copy both keep to it.
    #[arg(long, global = true)]
    max_bandwidth: Option<String>,
    /// Seconds a silent peer is tolerated.
    #[arg(long, global = true, default_value_t = 10.0)]
    idle_timeout: f64,
    /// File holding the shared secret (both sides; at least 16 bytes).
    #[arg(long, global = true)]
    secret_file: Option<PathBuf>,
    /// Encrypt every connection (pre-copy channels and post-copy's) with TLS 1.3 and mutual
    /// certificates from this directory (both sides; QEMU's tls-creds-x509 layout, as
    /// `pagewire gen-certs` writes it).
    #[arg(long, global = true)]
    tls_dir: Option<PathBuf>,
    /// Both roles in one command: TLS 1.3 with certificates generated for this run (or those
    /// of --tls-dir).
    #[arg(long)]
    tls: bool,
    /// Where post-copy's threads run (both roles): `F:B` puts the fault path on CPU F and the
    /// background stream on CPU B, `auto` the fault path on the last CPU and the stream on the
    /// others (`PostcopyCpus::split_allowed`). Default: unpinned.
    #[arg(long, global = true)]
    postcopy_cpus: Option<String>,
    /// Print one JSON object with the figures (dest: a `listening` line first).
    #[arg(long, global = true)]
    json: bool,
}

/// CLOCK_MONOTONIC in ns (one clock for every process on a host).
pub(crate) fn mono_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC)
}

/// CLOCK_REALTIME in ns.
pub(crate) fn real_ns() -> u64 {
    clock_ns(libc::CLOCK_REALTIME)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; clock_gettime writes only it.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// This host's boot id (empty if unreadable: the destination then uses CLOCK_REALTIME).
pub(crate) fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn secs(v: f64, what: &str) -> Res<Duration> {
    if (0.0..1e6).contains(&v) {
        Ok(Duration::from_secs_f64(v))
    } else {
        Err(format!("--{what} {v}: expected a number of seconds"))
    }
}

fn addr(s: &str, what: &str) -> Res<SocketAddr> {
    use std::net::ToSocketAddrs;
    s.to_socket_addrs()
        .map_err(|e| format!("--{what} '{s}': {e}"))?
        .next()
        .ok_or_else(|| format!("--{what} '{s}': no address"))
}

/// TLS settings from --tls-dir (the sender checks the name of the address it connects to:
/// `pagewire gen-certs` certifies localhost, 127.0.0.1 and ::1 by default).
fn tls_config(o: &Opts) -> Res<Option<TlsConfig>> {
    match &o.tls_dir {
        None if o.tls => Err(
            "--tls generates certificates only when one command runs both \
                              roles; give each role --tls-dir"
                .into(),
        ),
        None => Ok(None),
        Some(d) if !d.is_dir() => Err(format!("--tls-dir {}: not a directory", d.display())),
        Some(d) => Ok(Some(TlsConfig::from_dir(d))),
    }
}

/// `--postcopy-cpus`: `F:B` or `auto`.
fn postcopy_cpus(o: &Opts) -> Res<PostcopyCpus> {
    let Some(s) = o.postcopy_cpus.as_deref() else {
        return Ok(PostcopyCpus::default());
    };
    if s == "auto" {
        return Ok(PostcopyCpus::split_allowed());
    }
    let bad = || format!("--postcopy-cpus {s}: expected F:B (two CPU numbers) or auto");
    let (f, b) = s.split_once(':').ok_or_else(bad)?;
    let (f, b) = (
        f.parse::<usize>().map_err(|_| bad())?,
        b.parse::<usize>().map_err(|_| bad())?,
    );
    Ok(PostcopyCpus {
        fault_path: vec![f],
        background: vec![b],
    })
}

/// The settings both ends share: the idle timeout and the secret.
fn base_config(o: &Opts) -> Res<(Duration, Option<Secret>)> {
    let idle = secs(o.idle_timeout, "idle-timeout")?;
    if idle.is_zero() {
        return Err("--idle-timeout must be positive".into());
    }
    let secret = o
        .secret_file
        .as_deref()
        .map(|p| Secret::from_file(p).map_err(|e| e.to_string()))
        .transpose()?;
    Ok((idle, secret))
}

fn source_opts(o: &Opts, connect: SocketAddr) -> Res<source::SourceOpts> {
    let layout = Layout::new(parse_size(&o.memory)?, o.working_set)?;
    // The engine compresses a private copy of each page, so every codec is safe on a
    // running guest.
    let codec = match o.codec.as_str() {
        "auto" => CodecKind::Auto,
        "deflate" => CodecKind::Deflate,
        "none" => CodecKind::None,
        "qpl" => CodecKind::Qpl,
        c => {
            return Err(format!(
                "--codec {c}: kvm-demo takes auto, deflate, none or qpl"
            ))
        }
    };
    if o.channels == 0 {
        return Err("--channels must be at least 1".into());
    }
    if o.max_rounds == 0 {
        return Err("--max-rounds must be at least 1".into());
    }
    if !(o.downtime_limit > 0.0 && o.downtime_limit < 1e7) {
        return Err(format!(
            "--downtime-limit {}: expected a positive number of milliseconds",
            o.downtime_limit
        ));
    }
    let max_bandwidth = o
        .max_bandwidth
        .as_deref()
        .map(|r| r.parse::<Rate>())
        .transpose()
        .map_err(|e| format!("--max-bandwidth: {e}"))?;
    let postcopy = if o.postcopy {
        source::PostcopyMode::AfterRounds(o.precopy_rounds)
    } else if o.postcopy_fallback {
        source::PostcopyMode::Fallback
    } else {
        source::PostcopyMode::Off
    };
    Ok(source::SourceOpts {
        connect,
        layout,
        cfg: {
            let (idle, secret) = base_config(o)?;
            SenderConfig::default()
                .codec(codec)
                .channels(o.channels)
                .max_bandwidth(max_bandwidth)
                .idle_timeout(idle)
                .secret(secret)
                .tls(tls_config(o)?)
                .postcopy_cpus(postcopy_cpus(o)?)
        },
        max_rounds: o.max_rounds,
        downtime_limit: Duration::from_secs_f64(o.downtime_limit / 1e3),
        warmup: secs(o.warmup, "warmup")?,
        auto_converge: !o.no_auto_converge,
        min_passes_per_round: o.min_passes_per_round,
        postcopy,
    })
}

/// Run `pagewire kvm-demo`.
pub fn run(a: KvmArgs) -> Res<()> {
    match a.role {
        None => both(&a.opts),
        Some(Role::Source { connect }) => {
            let o = source_opts(&a.opts, addr(&connect, "connect")?)?;
            let json = a.opts.json;
            if !json {
                println!("{}", banner(&o));
                println!("{}", ROUND_HEADER);
            }
            let r = source::run(&o, |row| {
                if !json {
                    println!("{}", round_line(row));
                }
            })?;
            if json {
                println!("{}", json!({ "role": "source", "source": r }));
            } else {
                print!("{}", source_summary(&r));
            }
            Ok(())
        }
        Some(Role::Dest {
            listen,
            accept_timeout,
            insecure,
        }) => {
            let o = dest::DestOpts {
                listen: addr(&listen, "listen")?,
                mem_size: parse_size(&a.opts.memory)?,
                cfg: {
                    let (idle, secret) = base_config(&a.opts)?;
                    ReceiverConfig::default()
                        .insecure(insecure)
                        .idle_timeout(idle)
                        .secret(secret)
                        .tls(tls_config(&a.opts)?)
                        .postcopy_cpus(postcopy_cpus(&a.opts)?)
                },
                accept_timeout: accept_timeout
                    .map(|t| secs(t, "accept-timeout"))
                    .transpose()?,
                check_timeout: Duration::from_secs(10),
            };
            let json = a.opts.json;
            let r = dest::run(&o, |addr| {
                if json {
                    println!("{}", json!({ "listening": addr.to_string() }));
                } else {
                    println!("kvm-demo dest: listening on {addr}");
                }
            })?;
            if json {
                println!("{}", json!({ "role": "dest", "dest": r }));
            } else {
                print!("{}", dest_summary(&r));
            }
            Ok(())
        }
    }
}

const ROUND_HEADER: &str = "round      pages   zero pages   on the wire       time   dirtied meanwhile   throttle   predicted   decision";

fn banner(o: &source::SourceOpts) -> String {
    let cap = o.cfg.max_bandwidth.map_or(String::new(), |r| {
        format!(", link capped at {}/s", human_bytes(r.get()))
    });
    let ending = match o.postcopy {
        source::PostcopyMode::Off => String::new(),
        source::PostcopyMode::AfterRounds(n) => format!(", post-copy after {n} round(s)"),
        source::PostcopyMode::Fallback => {
            format!(
                ", post-copy if not converged within {} rounds",
                o.max_rounds
            )
        }
    };
    let tls = if o.cfg.tls.is_some() { ", TLS 1.3" } else { "" };
    format!(
        "kvm-demo: guest of {} with a working set of {} pages ({}), {} channel(s), codec {}, \
         downtime limit {:.1} ms{cap}{ending}{tls}",
        human_bytes(o.layout.mem_size),
        o.layout.ws_pages,
        human_bytes(o.layout.ws_pages * guest::PAGE),
        o.cfg.channels,
        o.cfg.codec.name(),
        o.downtime_limit.as_secs_f64() * 1e3
    )
}

fn round_line(r: &source::RoundRow) -> String {
    format!(
        "{:>5} {:>10} {:>12} {:>13} {:>8.1} ms {:>19} {:>8} % {:>8} ms   {}",
        r.round,
        r.pages,
        r.zero_pages,
        human_bytes(r.wire_bytes),
        r.seconds * 1e3,
        r.dirtied,
        r.throttle_pct,
        r.predicted_ms.map_or("-".into(), |p| format!("{p:.2}")),
        decision_text(&r.decision)
    )
}

fn decision_text(d: &pagewire::driver::Decision) -> String {
    use pagewire::driver::Decision;
    match d {
        Decision::Continue => "continue".into(),
        Decision::Throttle { percent } => format!("throttle to {percent} %"),
        Decision::Stop { .. } => "stop: the prediction fits".into(),
        Decision::Probe => "probe: an empty round measures the round trip".into(),
        Decision::GiveUp { reason } => format!("give up: {reason}"),
        Decision::PostCopy { reason } => format!("post-copy: {reason}"),
    }
}

fn source_summary(r: &source::SourceReport) -> String {
    let f = &r.final_phase;
    if let Some(pc) = &r.postcopy {
        return format!(
            "post-copy: paused at counter {}: vCPU stopped in {:.3} ms, state ({} bytes) read in \
             {:.3} ms, switch {:.2} ms; then {} pages ({} on the wire) \
             followed, {} requested by the guest's faults, the last placed {:.1} ms after the \
             switch\n\
             total {:.3} s, {} pages, {} on the wire\n",
            r.counter_at_pause,
            f.stop_ms,
            f.state_bytes,
            f.capture_ms,
            f.round_ms,
            pc.pages,
            human_bytes(pc.wire_bytes),
            pc.requests,
            pc.until_last_page_ms,
            r.total_seconds,
            r.total_pages,
            human_bytes(r.total_wire_bytes),
        );
    }
    format!(
        "final {:>10} {:>12} {:>13} {:>8.1} ms   (guest paused)\n\
         paused at counter {}: vCPU stopped in {:.3} ms, state ({} bytes) read in {:.3} ms, \
         final round {:.2} ms; session ended {:.2} ms after the pause (predicted {}, limit \
         {:.1} ms)\n\
         total {:.3} s, {} pages, {} on the wire; driver: {} continue, {} throttle, {} stop\n",
        f.pages,
        "",
        human_bytes(f.wire_bytes),
        f.round_ms,
        r.counter_at_pause,
        f.stop_ms,
        f.state_bytes,
        f.capture_ms,
        f.round_ms,
        f.pause_to_finish_ms,
        f.predicted_ms.map_or("-".into(), |p| format!("{p:.2} ms")),
        r.downtime_limit_ms,
        r.total_seconds,
        r.total_pages,
        human_bytes(r.total_wire_bytes),
        r.decisions.continued,
        r.decisions.throttled,
        r.decisions.stopped,
    )
}

/// The destination's post-copy figures, one paragraph.
fn postcopy_summary(pc: &dest::DestPostcopy) -> String {
    let hist: Vec<String> = pc
        .fault_histogram
        .iter()
        .enumerate()
        .filter(|(_, &n)| n > 0)
        .map(|(i, n)| format!("[{}, {}) µs: {n}", 1u64 << i, 2u64 << i))
        .collect();
    format!(
        "post-copy: {} pages arrived while the guest ran ({} requested by {} faults, {} in \
         the background); last page {:.1} ms after the resume\n\
         fault latency p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs; {}\n",
        pc.pages,
        pc.pages_urgent,
        pc.faults,
        pc.pages_background,
        pc.resume_to_last_page_ms,
        pc.fault_p50_us,
        pc.fault_p99_us,
        pc.fault_max_us,
        if hist.is_empty() {
            "no faults".to_string()
        } else {
            hist.join(", ")
        }
    )
}

fn dest_summary(r: &dest::DestReport) -> String {
    let pc = r
        .postcopy
        .as_ref()
        .map(postcopy_summary)
        .unwrap_or_default();
    pc + &format!(
        "destination: {} rounds, {} received ({} on the wire); guest resumed at counter {} \
         and reached {} ({:.1} ms later), where all {} working-set pages and its checksum {} \
         checked: verified\n\
         {} {:.2} ms after the pause; restore ({} → guest running): {:.3} ms\n\
         downtime (source pause → destination guest running, {}): {:.2} ms\n",
        r.rounds,
        human_bytes(r.received_memory_bytes),
        human_bytes(r.received_wire_bytes),
        r.counter_at_pause,
        r.counter_at_check,
        r.resume_to_check_ms,
        r.pages_checked,
        r.checksum,
        if r.postcopy.is_some() {
            "last page placed"
        } else {
            "session ended"
        },
        r.pause_to_session_end_ms,
        if r.postcopy.is_some() {
            "post-copy start"
        } else {
            "session end"
        },
        r.restore_ms,
        clock_name(r.downtime_clock),
        r.downtime_ms,
    )
}

fn clock_name(c: dest::DowntimeClock) -> &'static str {
    match c {
        dest::DowntimeClock::Monotonic => "one host, CLOCK_MONOTONIC",
        dest::DowntimeClock::Realtime => "two hosts, CLOCK_REALTIME",
    }
}

/// A child process that is killed if dropped before it is waited for.
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Both roles: the destination in a child process (this binary, `kvm-demo dest`), the
/// source here, over loopback.
fn both(o: &Opts) -> Res<()> {
    // --tls without a directory: certificates for this run, removed at its end.
    let certs = match (o.tls, &o.tls_dir) {
        (true, None) => Some(crate::TempCerts::new()?),
        _ => None,
    };
    let with_certs;
    let o = match &certs {
        Some(c) => {
            with_certs = Opts {
                tls_dir: Some(c.path().to_path_buf()),
                ..o.clone()
            };
            &with_certs
        }
        None => o,
    };
    // Validate before starting anything.
    let probe = source_opts(o, SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let exe = std::env::current_exe().map_err(|e| format!("finding this program: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "kvm-demo",
        "dest",
        "--listen",
        "127.0.0.1:0",
        "--accept-timeout",
        "30",
        "--json",
        "--memory",
        &o.memory,
        "--idle-timeout",
        &o.idle_timeout.to_string(),
    ]);
    if let Some(s) = &o.secret_file {
        cmd.arg("--secret-file").arg(s);
    }
    if let Some(d) = &o.tls_dir {
        cmd.arg("--tls-dir").arg(d);
    }
    if let Some(c) = &o.postcopy_cpus {
        cmd.arg("--postcopy-cpus").arg(c);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("starting the destination process: {e}"))?;
    let stdout = child.stdout.take().ok_or("destination stdout not piped")?;
    let pid = child.id();
    let mut guard = ChildGuard(Some(child));
    let mut lines = BufReader::new(stdout).lines();
    let mut next_json = |what: &str| -> Res<Value> {
        match lines.next() {
            Some(Ok(l)) => serde_json::from_str(&l)
                .map_err(|e| format!("destination printed '{l}' ({e}), expected {what}")),
            Some(Err(e)) => Err(format!("reading the destination's output: {e}")),
            None => Err(format!("the destination exited before printing {what}")),
        }
    };
    let listening = next_json("its address")?;
    let dest_addr = listening["listening"]
        .as_str()
        .ok_or("the destination printed no address")
        .and_then(|s| {
            s.parse::<SocketAddr>()
                .map_err(|_| "bad destination address")
        })?;
    let so = source::SourceOpts {
        connect: dest_addr,
        ..probe
    };
    if !o.json {
        println!("{}", banner(&so));
        println!("destination: process {pid} listening on {dest_addr}");
        println!("{ROUND_HEADER}");
    }
    let src = source::run(&so, |row| {
        if !o.json {
            println!("{}", round_line(row));
        }
    })?;
    if !o.json {
        print!("{}", source_summary(&src));
    }
    let d = next_json("its report")?;
    let status = guard
        .0
        .take()
        .ok_or("destination process lost")?
        .wait()
        .map_err(|e| format!("waiting for the destination: {e}"))?;
    if !status.success() {
        return Err(format!("the destination failed ({status})"));
    }
    let dest = d
        .get("dest")
        .cloned()
        .ok_or("the destination's report has no 'dest'")?;
    if dest["verified"] != Value::Bool(true) {
        return Err("the destination did not verify the guest".into());
    }
    if o.json {
        println!(
            "{}",
            json!({
                "memory_bytes": so.layout.mem_size,
                "working_set_pages": so.layout.ws_pages,
                "channels": so.cfg.channels,
                "codec": so.cfg.codec.name(),
                "max_bandwidth": so.cfg.max_bandwidth,
                "downtime_ms": dest["downtime_ms"],
                "downtime_limit_ms": src.downtime_limit_ms,
                "downtime_clock": dest["downtime_clock"],
                "verified": true,
                "source": src,
                "dest": dest,
            })
        );
    } else {
        let num = |k: &str| dest[k].as_f64().unwrap_or(f64::NAN);
        let int = |k: &str| dest[k].as_u64().unwrap_or(0);
        println!(
            "destination: guest resumed at counter {} and reached {} ({:.1} ms later); all {} \
             working-set pages and the guest's checksum {} checked: verified",
            int("counter_at_pause"),
            int("counter_at_check"),
            num("resume_to_check_ms"),
            int("pages_checked"),
            dest["checksum"].as_str().unwrap_or("?"),
        );
        let ended = if dest["postcopy"].is_object() {
            "last page placed"
        } else {
            "session ended"
        };
        let restore = if dest["postcopy"].is_object() {
            "post-copy start"
        } else {
            "session end"
        };
        println!(
            "destination {ended} {:.2} ms after the pause; restore ({restore} → guest \
             running) {:.3} ms",
            num("pause_to_session_end_ms"),
            num("restore_ms")
        );
        println!(
            "downtime (source pause → destination guest running, same host, CLOCK_MONOTONIC): {:.2} ms (limit {:.1} ms)",
            num("downtime_ms"),
            src.downtime_limit_ms
        );
        if let Ok(pc) = serde_json::from_value::<dest::DestPostcopy>(dest["postcopy"].clone()) {
            print!("{}", postcopy_summary(&pc));
        }
    }
    Ok(())
}

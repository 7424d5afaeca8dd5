//! `pagewire`: the example binary (demo, send, recv, decode).

use std::fs::File;
use std::io::{BufReader, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use pagewire::config::Pinning;
use pagewire::config::{Decoder, ZeroCopy};
use pagewire::decode::{decode_streams_with, DecodeStats};
use pagewire::internals::accel_qpl::{Huffman, QplPath, QplSettings};
use pagewire::tls::{GenerateSpec, TlsConfig};
use pagewire::AutoCompressor;
use pagewire::Secret;
use pagewire::{
    Block, BlockPages, CodecKind, GuestRam, Progress, Rate, ReceiveInto, Receiver, ReceiverConfig,
    RoundPages, Sender, SenderConfig, SessionStats,
};
use pagewire_synth::{self as synth, PageSet};
use serde_json::json;

mod format;
mod output;
mod sigbus;
use format::{parse_size, summary_table};
#[cfg(target_arch = "x86_64")]
mod kvm;

#[derive(Parser, Debug)]
#[command(
    name = "pagewire",
    version,
    about = "Moves VM memory pages between hosts (QEMU multifd wire format, io_uring)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Log filter (tracing EnvFilter syntax); RUST_LOG overrides.
    #[arg(long, global = true, default_value = "warn")]
    log: String,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Both ends in one process over loopback, on generated guest-like memory, verified.
    Demo(DemoArgs),
    /// Send an image file as guest memory to a receiver.
    Send(SendArgs),
    /// Receive one session, optionally writing the memory to a file.
    Recv(RecvArgs),
    /// Decode recorded multifd channel streams into a memory image.
    Decode(DecodeArgs),
    /// Write a CA and server and client certificates (QEMU's tls-creds-x509 layout) into
    /// DIR, for trying --tls-dir out.
    GenCerts(GenCertsArgs),
    /// Live-migrate a running KVM guest between two processes (docs/kvm.md).
    #[cfg(target_arch = "x86_64")]
    KvmDemo(kvm::KvmArgs),
}

#[derive(Args, Debug, Clone)]
struct Common {
    /// Print one JSON object with the figures instead of the table.
    #[arg(long)]
    json: bool,
    /// Seconds a silent peer is tolerated.
    #[arg(long, default_value_t = 30.0)]
    idle_timeout: f64,
    /// File holding the shared secret (at least 16 bytes); every connection proves it knows
    /// it. Both sides need the same file. Authentication only: without --tls-dir pages
    /// still travel in clear text.
    #[arg(long)]
    secret_file: Option<PathBuf>,
    /// Encrypt and authenticate every connection with TLS 1.3 and mutual certificates from
    /// this directory (QEMU's tls-creds-x509 layout: ca-cert.pem, server-cert.pem,
    /// server-key.pem, client-cert.pem, client-key.pem; see `pagewire gen-certs`).
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// Sender: the name the receiver's certificate must be valid for (default: the host
    /// part of --connect).
    #[arg(long)]
    tls_name: Option<String>,
    /// Plaintext bytes per TLS record (512..=16384).
    #[arg(long, default_value_t = pagewire_transport::tls::DEFAULT_RECORD_SIZE)]
    tls_record_size: usize,
    /// Channel threads' cores: auto (channel i on the i-th core), off, or a list like 0,2,4
    /// (default: auto for send and recv, off for demo).
    #[arg(long)]
    cpus: Option<String>,
    /// The VM's uuid (8-4-4-4-12 hex, QEMU's -uuid): send puts it in the hello and every
    /// channel's init packet (default: random per session); recv refuses another VM's.
    #[arg(long)]
    vm_uuid: Option<String>,
}

fn vm_uuid(c: &Common) -> Res<Option<[u8; 16]>> {
    c.vm_uuid
        .as_deref()
        .map(|s| {
            pagewire::config::parse_uuid(s)
                .ok_or_else(|| format!("--vm-uuid '{s}': expected 8-4-4-4-12 hex digits"))
        })
        .transpose()
}

fn pinning(c: &Common, default: Pinning) -> Res<Pinning> {
    match c.cpus.as_deref() {
        None => Ok(default),
        Some("auto") => Ok(Pinning::Auto),
        Some("off") => Ok(Pinning::Off),
        Some(list) => list
            .split(',')
            .map(|x| {
                x.trim().parse::<usize>().map_err(|_| {
                    format!("--cpus '{list}': expected auto, off or a list like 0,2,4")
                })
            })
            .collect::<Res<Vec<_>>>()
            .map(Pinning::Cpus),
    }
}

/// TLS settings from `--tls-dir`/`--tls-name`; a sender's default name is the host part of
/// the address it connects to.
fn tls_config(c: &Common, connect: Option<&str>) -> Res<Option<TlsConfig>> {
    let Some(dir) = &c.tls_dir else {
        if c.tls_name.is_some() {
            return Err("--tls-name needs --tls-dir".into());
        }
        return Ok(None);
    };
    if !dir.is_dir() {
        return Err(format!("--tls-dir {}: not a directory", dir.display()));
    }
    if !(512..=16384).contains(&c.tls_record_size) {
        return Err(format!(
            "--tls-record-size {} not in 512..=16384",
            c.tls_record_size
        ));
    }
    let mut t = TlsConfig::from_dir(dir);
    t.record_size = c.tls_record_size;
    t.server_name = c.tls_name.clone().or_else(|| {
        connect.and_then(|a| {
            a.rsplit_once(':')
                .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']').to_string())
        })
    });
    Ok(Some(t))
}

/// A directory of freshly generated certificates, deleted on drop.
pub(crate) struct TempCerts(PathBuf);

impl TempCerts {
    pub(crate) fn new() -> Res<TempCerts> {
        let dir = std::env::temp_dir().join(format!("pagewire-demo-certs-{}", std::process::id()));
        // This process's own directory (named by its pid): whatever a dead process of the
        // same pid left there is replaced.
        let spec = GenerateSpec {
            replace: true,
            ..GenerateSpec::default()
        };
        pagewire::tls::generate(&dir, &spec).map_err(|e| e.to_string())?;
        Ok(TempCerts(dir))
    }
}

impl TempCerts {
    /// The directory.
    pub(crate) fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempCerts {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn gen_certs(a: GenCertsArgs) -> Res<()> {
    let mut spec = GenerateSpec::default();
    if !a.hosts.is_empty() {
        spec.hosts = a.hosts.clone();
    }
    spec.valid_until_secs = i64::from(a.days.max(1)) * 24 * 3600;
    spec.replace = a.force;
    let replaced = pagewire::tls::existing_credentials(&a.dir);
    pagewire::tls::generate(&a.dir, &spec).map_err(|e| match e {
        pagewire::tls::CredentialsError::Exists { .. } => {
            format!("gen-certs: {e} (pass --force to replace them)")
        }
        e => format!("gen-certs: {e}"),
    })?;
    if replaced.iter().any(|f| f == "ca-cert.pem") {
        eprintln!(
            "pagewire gen-certs: warning: replaced the CA in {}: certificates the old CA issued \
             are no longer accepted by hosts using this directory; copy the new ca-cert.pem and \
             certificates to every host of the migration",
            a.dir.display()
        );
    }
    println!(
        "pagewire gen-certs: wrote ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem to {} (server valid for: {})",
        a.dir.display(),
        spec.hosts.join(", ")
    );
    Ok(())
}

fn secret(c: &Common) -> Res<Option<Secret>> {
    c.secret_file
        .as_deref()
        .map(|p| Secret::from_file(p).map_err(|e| e.to_string()))
        .transpose()
}

#[derive(Args, Debug, Clone)]
struct Tuning {
    /// Codec: none, deflate, qpl, or auto (follows the link: each page compressed only while
    /// the link is busy, else raw; with qpl where libqpl loads, deflate otherwise; see
    /// --auto-compressor).
    #[arg(long, default_value = "auto")]
    codec: String,
    /// Cap on the session's wire rate over all channels, e.g. 2.5gbit, 800mbit, 300MB/s,
    /// 1GiB/s, or bytes per second (default: no cap). Codec auto treats the cap as the link.
    #[arg(long)]
    max_bandwidth: Option<String>,
    /// Compression level: deflate 1..=12; qpl 1 (default) or 3 (high, QPL software path).
    #[arg(long, default_value_t = pagewire::config::DEFAULT_DEFLATE_LEVEL)]
    level: i32,
    /// qpl codec: Huffman mode, fixed (QEMU's setting) or dynamic.
    #[arg(long, default_value = "fixed")]
    huffman: String,
    /// qpl codec: auto (IAA if present), hardware (IAA only) or software (QPL's CPU path).
    #[arg(long, default_value = "auto")]
    qpl_path: String,
    /// Codec auto: the compressor for the pages it compresses: pick (the ladder where libqpl
    /// loads, else deflate), deflate, qpl alone (IAA if present, else QPL's software path), or
    /// ladder (qpl, and deflate for the pages a slow link waits for anyway).
    #[arg(long, default_value = "pick")]
    auto_compressor: String,
    /// Pages per multifd packet.
    #[arg(long, default_value_t = pagewire::config::DEFAULT_PAGES_PER_PACKET)]
    pages_per_packet: u32,
    /// Packets prepared ahead per channel.
    #[arg(long, default_value_t = 4)]
    depth: usize,
    /// SENDMSG_ZC: auto (non-loopback peers, sends of 64 KiB or more), on, or off.
    #[arg(long, default_value = "auto")]
    zero_copy: String,
    /// Receiver: READ_FIXED into registered buffers (on) or plain receives (off).
    #[arg(long, default_value = "on")]
    registered_buffers: String,
    /// Send pages a cheap sample shows incompressible raw, without trying (on), or try
    /// every page (off).
    #[arg(long, default_value = "on")]
    skip_incompressible: String,
    /// Ask the kernel which pages hold data (SEEK_DATA on image files, pagemap on anonymous
    /// memory) and send the others as zero pages without reading them (on), or read every
    /// page (off).
    #[arg(long, default_value = "on")]
    find_holes: String,
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// Guest memory size (bytes, or with KiB/MiB/GiB).
    #[arg(long, default_value = "256MiB")]
    size: String,
    /// Channel connections.
    #[arg(long, default_value_t = 2)]
    channels: u16,
    /// Seed of the generated memory.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Encrypt with TLS 1.3 and mutual certificates (generated for the demo unless
    /// --tls-dir is given).
    #[arg(long)]
    tls: bool,
    #[command(flatten)]
    tuning: Tuning,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug)]
struct SendArgs {
    /// Receiver address, host:port.
    #[arg(long)]
    connect: String,
    /// Image file sent as one memory block (mapped, never read into a buffer).
    #[arg(long)]
    image: PathBuf,
    /// Name of the memory block.
    #[arg(long, default_value = "pc.ram")]
    block_name: String,
    /// Channel connections (default: one per available core).
    #[arg(long)]
    channels: Option<u16>,
    /// Rounds to send: the first sends every page, each later one the pages rewritten since.
    #[arg(long, default_value_t = 1)]
    rounds: u32,
    /// Fraction of the pages rewritten between rounds (in a private copy-on-write mapping of
    /// the image; the file is never modified), simulating a live guest.
    #[arg(long, default_value_t = 0.1)]
    dirty_fraction: f64,
    /// Seed of the simulated guest's writes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write the sender's final memory (after the last round's rewrites) to this file (a new
    /// one: an existing file is refused unless --force).
    #[arg(long)]
    final_image: Option<PathBuf>,
    /// Let --final-image replace an existing file.
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    tuning: Tuning,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug)]
struct RecvArgs {
    /// Address to listen on, host:port.
    #[arg(long)]
    listen: String,
    /// Write the received memory (blocks in hello order) to this file once the session has
    /// completed: into a new file beside it, renamed over it only when complete (the sender
    /// succeeds only then). An existing file is refused unless --force.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Let --out replace an existing file (only once the session has completed; it is never
    /// touched otherwise).
    #[arg(long)]
    force: bool,
    /// Most guest memory the sender's data may commit here (default: this host's RAM). Pages
    /// never written cost nothing: a guest up to 256 times larger is accepted (with
    /// --prealloc, which commits every page, it must fit).
    #[arg(long)]
    max_memory: Option<String>,
    /// Give up if no sender connects within this many seconds (default: 600).
    #[arg(long)]
    accept_timeout: Option<f64>,
    /// DEFLATE decoder: auto (QPL on IAA if present, else built-in), builtin, or qpl.
    #[arg(long, default_value = "auto")]
    decoder: String,
    /// Without --secret-file, also accept senders that are not on loopback.
    #[arg(long)]
    insecure: bool,
    /// Populate the destination memory (fault every page in) before the first packet, as
    /// QEMU's destination prealloc does (default: off, like QEMU's).
    #[arg(long)]
    prealloc: bool,
    /// READ_FIXED into registered buffers (on) or plain receives (off).
    #[arg(long, default_value = "on")]
    registered_buffers: String,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug)]
struct GenCertsArgs {
    /// Directory to write (created if missing). Credentials already there are refused
    /// unless --force.
    dir: PathBuf,
    /// Replace credentials already in DIR (a replaced CA invalidates every certificate the
    /// old one issued: a warning says so).
    #[arg(long)]
    force: bool,
    /// A DNS name or IP address the receiver's certificate is valid for; repeat for several
    /// (default: localhost, 127.0.0.1, ::1).
    #[arg(long = "host")]
    hosts: Vec<String>,
    /// Days the certificates are valid.
    #[arg(long, default_value_t = 365)]
    days: u32,
}

#[derive(Args, Debug)]
struct DecodeArgs {
    /// A memory block, NAME=SIZE (SIZE in bytes or with KiB/MiB/GiB); repeat for several.
    #[arg(long = "block", required = true)]
    blocks: Vec<String>,
    /// Output image: the blocks in the order given (a new file: an existing one is refused
    /// unless --force, and replaced only once the decode has succeeded).
    #[arg(long)]
    out: PathBuf,
    /// Let --out replace an existing file.
    #[arg(long)]
    force: bool,
    /// Page size of the streams.
    #[arg(long, default_value_t = 4096)]
    page_size: u32,
    /// Pages per packet of the streams (default: learned from the first header; a stream
    /// opening with a QEMU SYNC is taken to use QEMU's 512 KiB packets).
    #[arg(long)]
    pages_per_packet: Option<u32>,
    /// Recorded channel streams, each starting with its init packet.
    #[arg(required = true)]
    captures: Vec<PathBuf>,
    /// Print one JSON object with the figures.
    #[arg(long)]
    json: bool,
}

type Res<T> = Result<T, String>;

/// Exit statuses (README, "Exit status").
mod exit {
    /// Failed: the migration did not complete.
    pub const FAILED: u8 = 1;
    /// `send` only: every round was acknowledged and the end sent, but the destination's
    /// confirmation never came; whether it completed is unknown.
    pub const OUTCOME_UNKNOWN: u8 = 3;
}

/// A failure and the exit status it maps to.
#[derive(Debug)]
struct Failure {
    message: String,
    status: u8,
}

impl From<&str> for Failure {
    fn from(message: &str) -> Self {
        Failure::from(message.to_string())
    }
}

impl From<String> for Failure {
    fn from(message: String) -> Self {
        Failure {
            message,
            status: exit::FAILED,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a terminal: a log redirected to a file stays plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
    let res: Result<(), Failure> = match cli.cmd {
        Cmd::Demo(a) => demo(a).map_err(Failure::from),
        Cmd::Send(a) => send(a),
        Cmd::Recv(a) => recv(a).map_err(Failure::from),
        Cmd::Decode(a) => decode(a).map_err(Failure::from),
        Cmd::GenCerts(a) => gen_certs(a).map_err(Failure::from),
        #[cfg(target_arch = "x86_64")]
        Cmd::KvmDemo(a) => kvm::run(a).map_err(Failure::from),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!(
                "pagewire: error: {}",
                cli_words(&f.message.replace('\n', " "))
            );
            ExitCode::from(f.status)
        }
    }
}

/// The library's errors name its settings (`tls`, `secret`, `insecure`); an operator of this
/// binary sets them with flags, so its messages name the flags.
fn cli_words(message: &str) -> String {
    message
        .replace(
            "the shared secret (`secret`) on both sides, or `insecure` on the receiver",
            "--secret-file on both sides, or --insecure on the receiver",
        )
        .replace("set `tls` on both sides", "use --tls-dir on both sides")
        .replace("(`tls`)", "(--tls-dir)")
        .replace("(`secret`)", "(--secret-file)")
}

/// The codec a name asks for; for `auto`, the compressor behind it is logged with the reason.
fn resolve_codec(name: &str, pref: AutoCompressor) -> Res<(CodecKind, String)> {
    match name {
        "auto" => {
            let (compressor, why) = pagewire::resolve_auto(pref);
            tracing::info!(compressor = compressor.name(), "codec auto: {why}");
            Ok((CodecKind::Auto, why))
        }
        other => other
            .parse::<CodecKind>()
            .map(|c| (c, "chosen on the command line".to_string())),
    }
}

/// The sender's settings, and whether a receiver in this process registers its buffers.
fn config(t: &Tuning, c: &Common, channels: u16) -> Res<(SenderConfig, bool)> {
    if !(c.idle_timeout > 0.0 && c.idle_timeout < 1e6) {
        return Err(format!(
            "--idle-timeout {} must be a positive number of seconds",
            c.idle_timeout
        ));
    }
    let auto_compressor = t.auto_compressor.parse::<AutoCompressor>()?;
    let (codec, _) = resolve_codec(&t.codec, auto_compressor)?;
    let zero_copy = match t.zero_copy.as_str() {
        "auto" => ZeroCopy::Auto,
        "on" => ZeroCopy::On,
        "off" => ZeroCopy::Off,
        o => return Err(format!("--zero-copy '{o}': expected auto, on or off")),
    };
    let registered_buffers = match t.registered_buffers.as_str() {
        "on" => true,
        "off" => false,
        o => return Err(format!("--registered-buffers '{o}': expected on or off")),
    };
    let huffman = t.huffman.parse::<Huffman>()?;
    let path = match t.qpl_path.as_str() {
        "auto" => QplPath::Auto,
        "hardware" => QplPath::Hardware,
        "software" => QplPath::Software,
        o => {
            return Err(format!(
                "--qpl-path '{o}': expected auto, hardware or software"
            ))
        }
    };
    let qpl = QplSettings {
        huffman,
        level: u32::try_from(t.level).unwrap_or(0),
        path,
        ..QplSettings::default()
    };
    let level = if codec == CodecKind::Qpl {
        pagewire::config::DEFAULT_DEFLATE_LEVEL
    } else {
        t.level
    };
    let skip_incompressible = match t.skip_incompressible.as_str() {
        "on" => true,
        "off" => false,
        o => return Err(format!("--skip-incompressible '{o}': expected on or off")),
    };
    let max_bandwidth = t
        .max_bandwidth
        .as_deref()
        .map(|r| r.parse::<Rate>().map_err(|e| e.to_string()))
        .transpose()?;
    let find_holes = match t.find_holes.as_str() {
        "on" => true,
        "off" => false,
        o => return Err(format!("--find-holes '{o}': expected on or off")),
    };
    let cfg = SenderConfig::default()
        .max_bandwidth(max_bandwidth)
        .find_holes(find_holes)
        .skip_incompressible(skip_incompressible)
        .zero_copy(zero_copy)
        .secret(secret(c)?)
        .vm_uuid(vm_uuid(c)?)
        .tls(tls_config(c, None)?)
        .codec(codec)
        .level(level)
        .auto_compressor(auto_compressor)
        .qpl(qpl)
        .pages_per_packet(t.pages_per_packet)
        .depth(t.depth)
        .channels(channels)
        .idle_timeout(Duration::from_secs_f64(c.idle_timeout));
    Ok((cfg, registered_buffers))
}

fn progress_bar(total: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb.set_prefix(what.to_string());
    pb
}

/// Drive `pb` from `progress` until `done` is set.
fn spawn_progress(
    pb: ProgressBar,
    progress: Arc<Progress>,
    page_size: u64,
) -> (
    Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<()>,
) {
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = done.clone();
    let h = std::thread::spawn(move || {
        while !d.load(std::sync::atomic::Ordering::Relaxed) {
            pb.set_position(progress.pages() * page_size);
            std::thread::sleep(Duration::from_millis(100));
        }
        pb.set_position(progress.pages() * page_size);
        pb.finish_and_clear();
    });
    (done, h)
}

fn stats_json(s: &SessionStats) -> serde_json::Value {
    json!({
        "memory_bytes": s.total.memory_bytes,
        "wire_bytes": s.total.wire_bytes,
        "seconds": s.seconds,
        "gbps": s.gbps(),
        "wire_ratio": s.wire_ratio(),
        "rounds": s.rounds,
        "cpu_seconds": s.total.cpu_seconds,
        "wire_gbps": s.wire_rate() / 1e9,
        "pages": pages_json(&s.total),
        "auto": {
            "link_gbps": s.total.link_rate / 1e9,
            "compress_gbps": s.total.compress_rate / 1e9,
        },
        "packets": s.total.packets,
        "zero_copy": {
            "sends": s.total.zc_sends,
            "notifications": s.total.zc_notifications,
            "copied_by_kernel": s.total.zc_copied,
        },
        "reads_fixed": s.total.reads_fixed,
        "jobs": {
            "hardware": s.total.jobs_hardware,
            "software": s.total.jobs_software,
            "busy_retries": s.total.busy_retries,
            "busy_fallbacks": s.total.busy_fallbacks,
            "failed": s.total.jobs_failed,
        },
        "channels": s.channels,
    })
}

fn pages_json(t: &pagewire::ChannelStats) -> serde_json::Value {
    json!({
        "normal": t.pages_normal,
        "zero": t.pages_zero,
        "raw": t.pages_raw,
        "compressed": t.pages_compressed,
        "skipped": t.pages_skipped,
        "raw_chosen": t.pages_raw_chosen,
        "raw_link_fast": t.pages_raw_link_fast,
        "raw_receiver_bound": t.pages_raw_receiver_bound,
        "compressed_strong": t.pages_compressed_strong,
        "incompressible": t.pages_incompressible,
        "zero_unread": t.pages_zero_unread,
        "left_out": t.pages_left_out,
    })
}

fn demo(a: DemoArgs) -> Res<()> {
    let size = parse_size(&a.size)?;
    let (mut cfg, registered_buffers) = config(&a.tuning, &a.common, a.channels)?;
    // Certificates made for this run only, removed when it ends.
    let _certs = match (a.tls, &cfg.tls) {
        (true, None) => {
            let dir = TempCerts::new()?;
            let mut t = TlsConfig::from_dir(&dir.0);
            t.record_size = a.common.tls_record_size;
            t.server_name = Some("localhost".into());
            cfg.tls = Some(t);
            Some(dir)
        }
        _ => None,
    };
    let ps = cfg.page_size as u64;
    if size == 0 || size % ps != 0 {
        return Err(format!(
            "--size {} is not a non-zero multiple of the page size {ps}",
            a.size
        ));
    }
    let size = usize::try_from(size).map_err(|_| "size too large for this host".to_string())?;
    // Both ends live in this process: the sender's generated memory and the receiver's copy.
    if let Some(avail) = format::available_memory() {
        let need = 2 * size as u64;
        if need > avail {
            return Err(format!(
                "--size {}: the demo holds both ends' copies of the guest in this process \
                 (about {}), but this host has {} of memory available; choose --size {}MiB or less",
                a.size,
                human(need),
                human(avail),
                (avail / 2) >> 20
            ));
        }
    }
    let gen0 = Instant::now();
    let block = Block::anonymous("pc.ram", size).map_err(|e| e.to_string())?;
    // SAFETY: the block was just created and nothing else references it yet.
    synth::fill(
        PageSet::Realistic,
        unsafe { block.as_mut_slice() },
        ps as usize,
        a.seed,
    );
    let gen_secs = gen0.elapsed().as_secs_f64();
    let mem = Arc::new(GuestRam::new(vec![block]).map_err(|e| e.to_string())?);

    let mut receiver = Receiver::bind(
        "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?,
        ReceiverConfig::for_sender(&cfg).registered_buffers(registered_buffers),
    )
    .map_err(|e| e.to_string())?;
    receiver.set_accept_timeout(Some(Duration::from_secs(30)));
    let addr = receiver.local_addr().map_err(|e| e.to_string())?;
    let rprogress = receiver.progress();
    let rthread = std::thread::Builder::new()
        .name("pw-demo-recv".into())
        .spawn(move || receiver.serve(ReceiveInto::Allocate))
        .map_err(|e| e.to_string())?;

    let mut sender =
        Sender::connect(addr, cfg.clone(), mem.clone()).map_err(|e| format!("sender: {e}"))?;
    let pb = if a.common.json {
        ProgressBar::hidden()
    } else {
        progress_bar(size as u64, "demo")
    };
    let (done, ph) = spawn_progress(pb, sender.progress(), ps);
    let sizes: Vec<u64> = mem.blocks().iter().map(|b| b.len() as u64).collect();
    let round = sender.send_round(RoundPages::all(&sizes, cfg.page_size, cfg.pages_per_packet));
    let finished = round.and_then(|_| sender.finish());
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = ph.join();
    let sstats = finished.map_err(|e| format!("sender: {e}"))?;
    let received = rthread
        .join()
        .map_err(|_| "receiver thread panicked".to_string())?
        .map_err(|e| format!("receiver: {e}"))?;
    let _ = rprogress;

    let v0 = Instant::now();
    let mut mismatched = Vec::new();
    for (src, dst) in mem.blocks().iter().zip(received.memory.blocks()) {
        // SAFETY: both sessions have ended; nothing writes either memory now.
        let same = unsafe { src.as_slice() == dst.as_slice() };
        if !same {
            mismatched.push(src.name().to_string());
        }
    }
    let verify_secs = v0.elapsed().as_secs_f64();
    let verified = mismatched.is_empty();
    if a.common.json {
        let out = json!({
            "command": "demo",
            "tls": cfg.tls.is_some(),
            "codec": cfg.codec.name(),
            "compressor": compressor(&cfg),
            "auto_choice": auto_line(cfg.codec, &sstats),
            "max_bandwidth": cfg.max_bandwidth,
            "channels": cfg.channels,
            "verified": verified,
            "generate_seconds": gen_secs,
            "verify_seconds": verify_secs,
            "sender": stats_json(&sstats),
            "receiver": stats_json(&received.stats),
        });
        println!("{out}");
    } else {
        println!(
            "pagewire demo: {} of generated guest memory, codec {}, {} channel(s), loopback{}",
            human(size as u64),
            cfg.codec.name(),
            cfg.channels,
            if cfg.tls.is_some() {
                ", TLS 1.3 (mutual certificates)"
            } else {
                ""
            }
        );
        print!("{}", summary_table(&sstats, &received.stats));
        if let Some(line) = auto_line(cfg.codec, &sstats) {
            println!("{line}");
        }
        println!(
            "verified: {}",
            if verified {
                "receiver memory is byte-identical to the sender's"
            } else {
                "MISMATCH"
            }
        );
    }
    if !verified {
        return Err(format!(
            "verification failed: blocks differ: {}",
            mismatched.join(", ")
        ));
    }
    Ok(())
}

/// `pagewire send`: exit status 0 only once the destination confirmed it has every page and
/// completed; [`exit::OUTCOME_UNKNOWN`] when that confirmation was lost after the end.
fn send(a: SendArgs) -> Result<(), Failure> {
    let channels = a.channels.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(255) as u16)
    });
    let (mut cfg, _) = config(&a.tuning, &a.common, channels)?;
    cfg.pinning = pinning(&a.common, Pinning::Auto)?;
    if a.rounds == 0 {
        return Err(Failure::from("--rounds must be at least 1".to_string()));
    }
    if !(0.0..=1.0).contains(&a.dirty_fraction) {
        return Err(Failure::from(format!(
            "--dirty-fraction {} must be in 0..=1",
            a.dirty_fraction
        )));
    }
    let addr = pagewire_transport::net::resolve(&a.connect).map_err(|e| e.to_string())?;
    cfg.tls = tls_config(&a.common, Some(&a.connect))?;
    let final_image = a
        .final_image
        .as_deref()
        .map(|p| output::Output::check(p, a.force))
        .transpose()?;
    let file = File::open(&a.image).map_err(|e| format!("{}: {e}", a.image.display()))?;
    // Several rounds rewrite pages between rounds: map the image copy-on-write so the file
    // itself is never modified. One round only reads it.
    let cow = a.rounds > 1;
    let block = Block::from_file(&a.block_name, &file, false, cow)
        .map_err(|e| format!("{}: {e}", a.image.display()))?;
    // Reading a page of the mapping past the file's end (the image truncated by someone else
    // during the send) raises SIGBUS: name it instead of dying silently.
    if let Err(e) = sigbus::name_bus_errors(&format!(
        "{}: the image file became shorter while it was being sent (truncated by another process?); the migration did not complete",
        a.image.display()
    )) {
        tracing::warn!("cannot install a SIGBUS handler: {e}");
    }
    // A read-only mapping loses nothing by dropping sent pages: resident memory stays bounded
    // by the packets in flight, not the image's size.
    let block = if cow {
        block
    } else {
        block.release_after_send()
    };
    let mem = Arc::new(GuestRam::new(vec![block]).map_err(|e| e.to_string())?);
    mem.check_page_size(cfg.page_size)
        .map_err(|e| format!("{}: {e}", a.image.display()))?;
    let ps = cfg.page_size as u64;
    let pages = mem.total_len() / ps;
    let dirty_per_round = ((pages as f64) * a.dirty_fraction).round() as u64;
    let mut sender = Sender::connect(addr, cfg.clone(), mem.clone()).map_err(|e| e.to_string())?;
    let total_pages = pages + dirty_per_round * u64::from(a.rounds - 1);
    let pb = if a.common.json {
        ProgressBar::hidden()
    } else {
        progress_bar(total_pages * ps, "send")
    };
    let (done, ph) = spawn_progress(pb, sender.progress(), ps);
    let sizes: Vec<u64> = mem.blocks().iter().map(|b| b.len() as u64).collect();
    let mut guest = SimulatedGuest::new(a.seed, pages, cfg.page_size as usize);
    let mut per_round = Vec::new();
    let mut res = Ok(());
    for round in 1..=a.rounds {
        let sel = if round == 1 {
            RoundPages::all(&sizes, cfg.page_size, cfg.pages_per_packet)
        } else {
            let block = mem.block(0).ok_or("no memory block")?;
            // SAFETY: no round is running: nothing else reads or writes the mapping now.
            let dirty = guest.rewrite(unsafe { block.as_mut_slice() }, dirty_per_round, round);
            RoundPages::new(
                vec![(0, BlockPages::Offsets(dirty))],
                &sizes,
                cfg.page_size,
                cfg.pages_per_packet,
            )
        };
        match sender.send_round(sel) {
            Ok(st) => per_round.push(st),
            Err(e) => {
                res = Err(e);
                break;
            }
        }
    }
    let res = res.and_then(|()| sender.finish());
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = ph.join();
    let stats = res.map_err(|e| Failure {
        status: if e.outcome_unknown() {
            exit::OUTCOME_UNKNOWN
        } else {
            exit::FAILED
        },
        message: e.to_string(),
    })?;
    if let Some(out) = &final_image {
        out.write(|f| write_memory(&mem, f))?;
    }
    if a.common.json {
        let mut v = stats_json(&stats);
        v["command"] = json!("send");
        v["tls"] = json!(cfg.tls.is_some());
        v["codec"] = json!(cfg.codec.name());
        v["compressor"] = json!(compressor(&cfg));
        v["auto_choice"] = json!(auto_line(cfg.codec, &stats));
        v["max_bandwidth"] = json!(cfg.max_bandwidth);
        v["per_round"] = json!(per_round
            .iter()
            .enumerate()
            .map(|(i, r)| round_json(i as u64 + 1, r))
            .collect::<Vec<_>>());
        println!("{v}");
    } else {
        println!(
            "pagewire send: {} to {}, codec {}, {} channel(s), {} round(s)",
            human(mem.total_len()),
            addr,
            cfg.codec.name(),
            cfg.channels,
            a.rounds
        );
        if per_round.len() > 1 {
            print!("{}", format::rounds_table(&per_round));
        }
        print!("{}", format::side_table("sender", &stats));
        if let Some(line) = auto_line(cfg.codec, &stats) {
            println!("{line}");
        }
    }
    Ok(())
}

/// The compressor a session's codec uses on this host (auto: see `codec::resolve_auto`).
fn compressor(cfg: &SenderConfig) -> &'static str {
    match cfg.codec {
        CodecKind::Auto => match pagewire::resolve_auto(cfg.auto_compressor).0 {
            // The session adds deflate beside qpl (not beside deflate, where qpl is missing).
            CodecKind::Qpl if pagewire::internals::auto_ladder(cfg.auto_compressor) => {
                "qpl+deflate"
            }
            c => c.name(),
        },
        CodecKind::None => "none",
        c => c.name(),
    }
}

/// Codec auto, in one line: what it chose and why.
fn auto_line(codec: CodecKind, s: &SessionStats) -> Option<String> {
    if codec != CodecKind::Auto {
        return None;
    }
    let t = &s.total;
    let normal = t.pages_normal.max(1) as f64;
    let pct = |n: u64| 100.0 * n as f64 / normal;
    let fast = t.pages_raw_link_fast;
    let bound = t.pages_raw_receiver_bound;
    let idle = t.pages_raw_chosen.saturating_sub(fast + bound);
    let why = if t.pages_raw_chosen == 0 {
        "the link stayed busy, so compression cost no time".to_string()
    } else if bound >= fast && bound >= idle {
        format!(
            "mostly raw because the receiver, not the link, was the bottleneck (its window \
             limited the connection; link {:.2} GB/s, compressor {:.2} GB/s of pages)",
            t.link_rate / 1e9,
            t.compress_rate / 1e9
        )
    } else if fast >= idle {
        format!(
            "mostly raw because compressing would not pay: the link time a page saves was \
             under a third of its compression time \
             (link {:.2} GB/s, compressor {:.2} GB/s of pages)",
            t.link_rate / 1e9,
            t.compress_rate / 1e9
        )
    } else {
        format!(
            "raw whenever the link would have waited for compressed pages \
             (link {:.2} GB/s, compressor {:.2} GB/s of pages)",
            t.link_rate / 1e9,
            t.compress_rate / 1e9
        )
    };
    let strong = if t.pages_compressed_strong > 0 {
        format!(
            " ({:.0} % by the stronger deflate)",
            pct(t.pages_compressed_strong)
        )
    } else {
        String::new()
    };
    Some(format!(
        "auto: {:.0} % of the data pages compressed{strong}, {:.0} % raw by choice, {:.0} % raw \
         as incompressible: {why}",
        pct(t.pages_compressed),
        pct(t.pages_raw_chosen),
        pct(t.pages_incompressible)
    ))
}

fn round_json(round: u64, r: &SessionStats) -> serde_json::Value {
    json!({
        "round": round,
        "memory_bytes": r.total.memory_bytes,
        "wire_bytes": r.total.wire_bytes,
        "seconds": r.seconds,
        "wire_gbps": r.wire_rate() / 1e9,
        "pages": pages_json(&r.total),
        "auto": {
            "link_gbps": r.total.link_rate / 1e9,
            "compress_gbps": r.total.compress_rate / 1e9,
        },
    })
}

/// A guest that rewrites pages between rounds: deterministic from its seed.
struct SimulatedGuest {
    state: u64,
    pages: u64,
    page_size: usize,
}

impl SimulatedGuest {
    fn new(seed: u64, pages: u64, page_size: usize) -> Self {
        SimulatedGuest {
            state: seed ^ 0x9E37_79B9_7F4A_7C15,
            pages,
            page_size,
        }
    }

    fn next(&mut self) -> u64 {
        // splitmix64
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Rewrite `n` distinct pages of `mem` (a third zeroed, a third text, a third random
    /// bytes) and return their offsets, sorted.
    fn rewrite(&mut self, mem: &mut [u8], n: u64, round: u32) -> Vec<u64> {
        let n = n.min(self.pages);
        let mut chosen = vec![0u64; self.pages.div_ceil(64) as usize];
        let mut picked = 0;
        // Rejection sampling, or every page when (almost) all are asked for.
        if n * 10 >= self.pages * 9 {
            for p in 0..n {
                chosen[(p / 64) as usize] |= 1 << (p % 64);
            }
            picked = n;
        }
        while picked < n {
            let p = self.next() % self.pages;
            let (w, b) = ((p / 64) as usize, p % 64);
            if chosen[w] & (1 << b) == 0 {
                chosen[w] |= 1 << b;
                picked += 1;
            }
        }
        let ps = self.page_size;
        let mut offsets = Vec::with_capacity(n as usize);
        for p in 0..self.pages {
            if chosen[(p / 64) as usize] & (1 << (p % 64)) == 0 {
                continue;
            }
            let Some(page) = mem.get_mut(p as usize * ps..(p as usize + 1) * ps) else {
                continue;
            };
            match self.next() % 3 {
                0 => page.fill(0),
                1 => {
                    let line = format!("round {round} page {p}: the guest wrote this line again. ");
                    for (i, b) in page.iter_mut().enumerate() {
                        *b = line.as_bytes()[i % line.len()];
                    }
                }
                _ => {
                    for chunk in page.chunks_mut(8) {
                        let r = self.next().to_le_bytes();
                        chunk.copy_from_slice(&r[..chunk.len()]);
                    }
                }
            }
            offsets.push(p * ps as u64);
        }
        offsets
    }
}

fn recv(a: RecvArgs) -> Res<()> {
    let addr = pagewire_transport::net::resolve(&a.listen).map_err(|e| e.to_string())?;
    if !(a.common.idle_timeout > 0.0 && a.common.idle_timeout < 1e6) {
        return Err(format!(
            "--idle-timeout {} must be a positive number of seconds",
            a.common.idle_timeout
        ));
    }
    let registered_buffers = match a.registered_buffers.as_str() {
        "on" => true,
        "off" => false,
        o => return Err(format!("--registered-buffers '{o}': expected on or off")),
    };
    let mut cfg = ReceiverConfig::default()
        .idle_timeout(Duration::from_secs_f64(a.common.idle_timeout))
        .secret(secret(&a.common)?)
        .vm_uuid(vm_uuid(&a.common)?)
        .tls(tls_config(&a.common, None)?)
        .insecure(a.insecure)
        .prealloc(a.prealloc)
        .pinning(pinning(&a.common, Pinning::AutoFromLast)?)
        .registered_buffers(registered_buffers);
    if let Some(m) = &a.max_memory {
        cfg.max_memory = parse_size(m)?;
    }
    cfg.decoder = match a.decoder.as_str() {
        "auto" => Decoder::Auto,
        "builtin" => Decoder::Builtin,
        "qpl" => Decoder::Qpl,
        o => return Err(format!("--decoder '{o}': expected auto, builtin or qpl")),
    };
    if cfg.decoder == Decoder::Qpl {
        // Fail at start, not when the first sender arrives.
        pagewire::internals::decoder_for(Decoder::Qpl).map_err(|e| e.to_string())?;
    }
    // Fail early on an output that cannot be written or must not be replaced, before the
    // sender spends its time; the target itself is not touched until the session completes.
    let out = a
        .out
        .as_deref()
        .map(|p| output::Output::check(p, a.force))
        .transpose()?;
    let tls_on = cfg.tls.is_some();
    let mut receiver = Receiver::bind(addr, cfg).map_err(|e| e.to_string())?;
    if let Some(t) = a.accept_timeout {
        receiver.set_accept_timeout(Some(Duration::from_secs_f64(t.max(0.0))));
    }
    tracing::info!(addr = %receiver.local_addr().map_err(|e| e.to_string())?, "listening");
    // The memory is written out before the sender is told the session completed: a sender
    // that exits 0 means the file is complete.
    let write_secs = std::sync::Mutex::new(0.0);
    let done = receiver
        .serve_and_commit(ReceiveInto::Allocate, |memory, _state| {
            if let Some(out) = &out {
                let t = Instant::now();
                out.write(|file| write_memory(memory, file))?;
                if let Ok(mut w) = write_secs.lock() {
                    *w = t.elapsed().as_secs_f64();
                }
            }
            Ok(())
        })
        .map_err(|e| e.to_string())?;
    let write_secs = write_secs.into_inner().unwrap_or(0.0);
    if a.common.json {
        let mut v = stats_json(&done.stats);
        v["command"] = json!("recv");
        v["tls"] = json!(tls_on);
        v["write_seconds"] = json!(write_secs);
        println!("{v}");
    } else {
        println!(
            "pagewire recv: {} received",
            human(done.stats.total.memory_bytes)
        );
        print!("{}", format::side_table("receiver", &done.stats));
    }
    Ok(())
}

/// Write the memory's blocks, in order, to `file`. A regular file gets runs of non-zero
/// pages written at their offsets and all-zero pages left as holes (a sparse image, as the
/// one sent usually is), then is synced; anything else (`/dev/null`, a pipe) gets every byte
/// in order and no sync (fsync on a character device fails with EINVAL).
fn write_memory(mem: &GuestRam, file: File) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let regular = file.metadata()?.file_type().is_file();
    if !regular {
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        for b in mem.blocks() {
            // SAFETY: the session has ended; no thread writes the memory any more.
            w.write_all(unsafe { b.as_slice() })?;
        }
        return w.flush();
    }
    const PAGE: usize = 4096;
    const MAX_RUN: usize = 8 << 20;
    file.set_len(0)?;
    let mut base = 0u64;
    for b in mem.blocks() {
        // SAFETY: the session has ended; no thread writes the memory any more.
        let bytes = unsafe { b.as_slice() };
        let mut run: Option<usize> = None;
        for (i, page) in bytes.chunks(PAGE).enumerate() {
            let at = i * PAGE;
            let zero = pagewire::internals::is_zero_page(page);
            match (run, zero) {
                (Some(start), true) => {
                    file.write_all_at(&bytes[start..at], base + start as u64)?;
                    run = None;
                }
                (Some(start), false) if at - start >= MAX_RUN => {
                    file.write_all_at(&bytes[start..at], base + start as u64)?;
                    run = Some(at);
                }
                (None, false) => run = Some(at),
                _ => {}
            }
        }
        if let Some(start) = run {
            file.write_all_at(&bytes[start..], base + start as u64)?;
        }
        base += bytes.len() as u64;
    }
    // The holes at the end, if any, count in the length.
    file.set_len(base)?;
    file.sync_all()
}

fn decode(a: DecodeArgs) -> Res<()> {
    let out = output::Output::check(&a.out, a.force)?;
    let mut blocks = Vec::new();
    for spec in &a.blocks {
        let (name, size) = spec
            .split_once('=')
            .ok_or_else(|| format!("--block '{spec}': expected NAME=SIZE"))?;
        let size = parse_size(size)?;
        let size = usize::try_from(size).map_err(|_| format!("--block '{spec}': too large"))?;
        blocks.push(Block::anonymous(name, size).map_err(|e| e.to_string())?);
    }
    let mem = GuestRam::new(blocks).map_err(|e| e.to_string())?;
    mem.check_page_size(a.page_size)
        .map_err(|e| e.to_string())?;
    let mut captures = Vec::new();
    for p in &a.captures {
        let f = File::open(p).map_err(|e| format!("{}: {e}", p.display()))?;
        captures.push((
            p.display().to_string(),
            BufReader::with_capacity(1 << 20, f),
        ));
    }
    let t = Instant::now();
    let stats: DecodeStats = decode_streams_with(&mem, captures, a.page_size, a.pages_per_packet)
        .map_err(|e| e.to_string())?;
    let secs = t.elapsed().as_secs_f64();
    out.write(|file| write_memory(&mem, file))?;
    if a.json {
        let v = json!({
            "command": "decode",
            "memory_bytes": mem.total_len(),
            "wire_bytes": stats.total.wire_bytes,
            "seconds": secs,
            "gbps": if secs > 0.0 { stats.total.memory_bytes as f64 / secs / 1e9 } else { 0.0 },
            "rounds": stats.rounds,
            "opening_sync": stats.opening_sync,
            "compression": stats.compression,
            "pages_per_packet": stats.pages_per_packet,
            "pages": {
                "normal": stats.total.pages_normal,
                "zero": stats.total.pages_zero,
                "raw": stats.total.pages_raw,
                "compressed": stats.total.pages_compressed,
            },
            "channels": stats.channels,
        });
        println!("{v}");
    } else {
        println!(
            "pagewire decode: {} capture(s), {} round(s){}, compression {}, {} pages applied ({} zero) -> {}",
            a.captures.len(),
            stats.rounds,
            if stats.opening_sync { " after an opening SYNC" } else { "" },
            stats.compression,
            stats.total.pages_normal + stats.total.pages_zero,
            stats.total.pages_zero,
            a.out.display()
        );
    }
    Ok(())
}

fn human(bytes: u64) -> String {
    format::human_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::cli_words;

    /// The library names its settings; the operator of this binary reads its flags.
    #[test]
    fn library_settings_read_as_flags() {
        let e = "handshake: the receiver closed the control connection before its challenge \
                 (a receiver with TLS credentials closes clear-text senders: set `tls` on both sides)";
        assert!(
            cli_words(e).ends_with("use --tls-dir on both sides)"),
            "{}",
            cli_words(e)
        );
        let e = "authentication failed: refusing 192.0.2.1:5: it is not on loopback and no shared \
                 secret is configured (set the shared secret (`secret`) on both sides, or \
                 `insecure` on the receiver for a trusted network)";
        let c = cli_words(e);
        assert!(
            c.contains("--secret-file on both sides, or --insecure on the receiver"),
            "{c}"
        );
        assert!(!c.contains('`'), "{c}");
        let e = "this receiver has none (`secret`)";
        assert_eq!(cli_words(e), "this receiver has none (--secret-file)");
        // The feature's name is not a setting.
        let e = "pagewire was built without the `tls` feature";
        assert_eq!(cli_words(e), e);
    }
}

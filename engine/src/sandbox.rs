//! The system calls each pagewire thread makes, for a VMM that runs every thread under a
//! seccomp filter: build each role's filter from [`syscalls`] and install it from the
//! [`ThreadHook`](crate::threads::ThreadHook) (`SenderConfig::threads`, `ReceiverConfig::threads`), which runs first on every
//! thread pagewire starts. engine/tests/sandbox.rs does exactly that with the rust-vmm
//! `seccompiler` crate, default action *kill the process*, and completes pre-copy (none,
//! deflate, auto, TLS) and post-copy migrations byte-identical; docs/sandboxing.md has the
//! same lists as tables, what each call is for, and the io_uring opcodes (which seccomp does
//! not see).
//!
//! The lists hold what pagewire's code calls on each thread (drawn up from `strace -f` of
//! those tests and from the code), plus [`COMMON`]: what the Rust runtime and the allocator
//! call on any thread (memory, futexes, thread exit, sleeping, clocks, log output). They do
//! not cover the threads that *call* pagewire (the VMM's own: `Sender::connect`,
//! `Receiver::serve`, …), which open sockets, map memory and register userfaultfd; nor what
//! an embedder's own callbacks run (a commit callback, a post-copy start hook).
//!
//! x86_64 and aarch64 (where glibc's `poll` is the `ppoll` call).

use crate::threads::ThreadRole;

/// A system call a thread makes: its name and its number on this architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Syscall {
    /// Its name, as in `man 2` and seccompiler's JSON.
    pub name: &'static str,
    /// Its number on this architecture (`libc::SYS_*`).
    pub nr: i64,
}

/// Which optional parts a session uses: each adds calls to some roles.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Mode {
    /// TLS (`tls` in either config). Adds no call: the record layer works on the channels' buffers,
    /// and the handshake threads' reads and writes are the plain session's. (Kept so that a
    /// filter built per mode stays right if that changes.)
    pub tls: bool,
    /// The QPL accelerator path (`codec qpl`, or `auto` where libqpl loads). Unverified on IAA
    /// hardware: QPL's hardware path opens and maps the accelerator's work queue
    /// (`/dev/iax/wq*`) from the channel loops.
    pub qpl: bool,
}

impl Mode {
    /// Pre-copy without TLS or QPL (the `none`, `deflate` and `auto` codecs' software path).
    pub const PLAIN: Mode = Mode {
        tls: false,
        qpl: false,
    };

    /// With TLS.
    pub fn with_tls(mut self) -> Mode {
        self.tls = true;
        self
    }

    /// With the QPL accelerator path.
    pub fn with_qpl(mut self) -> Mode {
        self.qpl = true;
        self
    }
}

/// The calls named by their `libc::SYS_*` constants, the prefix stripped for the names.
macro_rules! calls {
    ($($name:ident),* $(,)?) => {
        &[$(Syscall { name: strip(stringify!($name)), nr: libc::$name as i64 }),*]
    };
}

const fn strip(s: &'static str) -> &'static str {
    match s.as_bytes() {
        [b'S', b'Y', b'S', b'_', rest @ ..] => {
            // SAFETY: `rest` is the tail of a valid UTF-8 string after an ASCII prefix, so it
            // is valid UTF-8 too.
            unsafe { std::str::from_utf8_unchecked(rest) }
        }
        _ => s,
    }
}

/// What any thread calls: the allocator (mmap, munmap, mprotect, madvise, mremap, brk),
/// locks and channels (futex), thread exit (exit, munmap of its stack, sigaltstack,
/// rt_sigprocmask), sleeping and yielding, clocks, `HashMap` seeds (getrandom), closing
/// descriptors, and log output (write, writev) where the embedder's tracing subscriber
/// writes from the thread. glibc's malloc also opens and reads two files once per process,
/// on whichever thread first needs them (openat, read): `/proc/sys/vm/overcommit_memory`
/// when it first trims a thread's heap, `/sys/devices/system/cpu/online` when threads
/// outnumber its first 8 arenas (unless `M_ARENA_MAX` is set). Seen on pagewire's threads in
/// the tests; an embedder whose process has made both checks before may drop the two.
pub const COMMON: &[Syscall] = calls!(
    SYS_openat,
    SYS_read,
    SYS_futex,
    SYS_mmap,
    SYS_munmap,
    SYS_mprotect,
    SYS_madvise,
    SYS_mremap,
    SYS_brk,
    SYS_exit,
    SYS_rt_sigprocmask,
    SYS_sigaltstack,
    SYS_sched_yield,
    SYS_nanosleep,
    SYS_clock_nanosleep,
    SYS_clock_gettime,
    SYS_gettid,
    SYS_getrandom,
    SYS_close,
    SYS_write,
    SYS_writev,
);

#[cfg(target_arch = "x86_64")]
const POLL: &[Syscall] = calls!(SYS_poll, SYS_ppoll);
#[cfg(not(target_arch = "x86_64"))]
const POLL: &[Syscall] = calls!(SYS_ppoll);

/// A channel loop (send or receive): its io_uring (set up, entered, buffers registered on
/// the thread itself), CPU pinning (`pinning`), its CPU time, socket flags.
const CHANNEL: &[Syscall] = calls!(
    SYS_io_uring_setup,
    SYS_io_uring_enter,
    SYS_io_uring_register,
    SYS_fcntl,
    SYS_sched_setaffinity,
    SYS_sched_getaffinity,
);

/// A sender's channel loop besides [`CHANNEL`]: which pages hold data (`/proc/self/pagemap`
/// for anonymous memory; SEEK_DATA/SEEK_HOLE and mincore for file-backed memory), and for
/// codec auto the socket's unsent bytes (ioctl SIOCOUTQ) and TCP_INFO (getsockopt).
const SEND_CHANNEL: &[Syscall] = calls!(
    SYS_openat,
    SYS_pread64,
    SYS_lseek,
    SYS_mincore,
    SYS_ioctl,
    SYS_getsockopt,
);

/// What a new thread calls before its hook runs (the C library's and Rust's thread set-up),
/// under the filter of the thread that started it: seccomp filters are inherited, and a
/// thread's own filter stacks on top (a call passes only if every filter allows it). The
/// hook installing the new thread's filter calls prctl (no_new_privs) and seccomp.
const THREAD_START: &[Syscall] = calls!(
    SYS_seccomp,
    SYS_clone3,
    SYS_clone,
    SYS_rseq,
    SYS_set_robust_list,
    SYS_prctl,
    SYS_sched_getaffinity,
);

/// The front door: waits on the listener and its stop pipe, accepts, starts a handshake
/// thread per connection (clone3 and its stack), shuts pending connections at their
/// deadline. Its handshake threads inherit its filter, so it allows theirs too
/// ([`HANDSHAKE`], [`THREAD_START`]).
const DOOR: &[Syscall] = calls!(
    SYS_accept4,
    SYS_fcntl,
    SYS_clone3,
    SYS_clone,
    SYS_shutdown,
    SYS_read,
);

/// A handshake: reads and writes the connection (blocking, with timeouts set by
/// setsockopt), names the peer.
const HANDSHAKE: &[Syscall] = calls!(
    SYS_recvfrom,
    SYS_sendto,
    SYS_setsockopt,
    SYS_getsockopt,
    SYS_getpeername,
    SYS_getsockname,
    SYS_fcntl,
    SYS_shutdown,
);

/// Post-copy source: serves page requests and streams pages (blocking socket I/O), raises
/// its priority (setpriority), runs on its CPUs (`postcopy_cpus`), shuts connections when
/// the phase ends or they break.
const POSTCOPY_SEND: &[Syscall] = calls!(
    SYS_recvfrom,
    SYS_sendto,
    SYS_fcntl,
    SYS_setsockopt,
    SYS_shutdown,
    SYS_setpriority,
    SYS_sched_setaffinity,
);

/// Post-copy destination, a connection's reader: receives pages and places them
/// (ioctl UFFDIO_COPY, UFFDIO_ZEROPAGE, UFFDIO_WAKE), wakes the fault thread (an eventfd),
/// runs on its CPUs (`postcopy_cpus`).
const POSTCOPY_RECV: &[Syscall] = calls!(
    SYS_recvfrom,
    SYS_sendto,
    SYS_fcntl,
    SYS_ioctl,
    SYS_shutdown,
    SYS_setpriority,
    SYS_read,
    SYS_sched_setaffinity,
);

/// Post-copy destination, the fault thread: reads userfaultfd events, sends page requests,
/// waits on the userfaultfd and its eventfd, runs on its CPUs (`postcopy_cpus`).
const POSTCOPY_FAULTS: &[Syscall] = calls!(
    SYS_read,
    SYS_sendto,
    SYS_ioctl,
    SYS_setpriority,
    SYS_sched_setaffinity,
);

/// QPL's hardware path (unverified here: no IAA): opens and maps the work queue, asks the
/// driver (ioctl) and submits (write where the portal is not mapped).
const QPL_CHANNEL: &[Syscall] = calls!(SYS_openat, SYS_read, SYS_ioctl, SYS_pread64);

/// Every call a thread of `role` may make in a session of `mode`: [`COMMON`] and the role's
/// own, each once.
pub fn syscalls(role: ThreadRole, mode: Mode) -> Vec<Syscall> {
    let mut parts: Vec<&[Syscall]> = vec![COMMON];
    match role {
        ThreadRole::SendChannel | ThreadRole::RecvChannel => {
            parts.push(CHANNEL);
            if role == ThreadRole::SendChannel {
                parts.push(SEND_CHANNEL);
            }
            if mode.qpl && role == ThreadRole::SendChannel {
                parts.push(QPL_CHANNEL);
            }
        }
        ThreadRole::Door => parts.extend([DOOR, POLL, HANDSHAKE, THREAD_START]),
        ThreadRole::Handshake => parts.extend([HANDSHAKE, POLL]),
        // Runs the embedder's commit callback: pagewire itself adds nothing.
        ThreadRole::Commit => {}
        ThreadRole::PostcopySend => parts.extend([POSTCOPY_SEND, POLL]),
        ThreadRole::PostcopyRecv => parts.extend([POSTCOPY_RECV, POLL]),
        ThreadRole::PostcopyFaults => parts.extend([POSTCOPY_FAULTS, POLL]),
    }
    let mut out: Vec<Syscall> = Vec::new();
    for s in parts.into_iter().flatten() {
        if !out.iter().any(|o| o.nr == s.nr) {
            out.push(*s);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_calls_names() {
        let all = syscalls(ThreadRole::SendChannel, Mode::PLAIN);
        let uring = all.iter().find(|s| s.name == "io_uring_enter");
        assert_eq!(uring.map(|s| s.nr), Some(libc::SYS_io_uring_enter));
        assert!(all.iter().all(|s| !s.name.starts_with("SYS_")));
        // Each once, though several parts name fcntl.
        assert_eq!(all.iter().filter(|s| s.name == "fcntl").count(), 1);
        // The door allows its handshake threads' calls (they inherit its filter).
        let door = syscalls(ThreadRole::Door, Mode::PLAIN);
        for s in syscalls(ThreadRole::Handshake, Mode::PLAIN) {
            assert!(door.contains(&s), "{}", s.name);
        }
    }
}

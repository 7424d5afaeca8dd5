//! userfaultfd behind safe functions: the only place pagewire makes these system calls.
//!
//! Raw `ioctl`s through `libc` rather than the `userfaultfd` crate: the calls needed are
//! five (API, REGISTER, COPY, WAKE, and reading events), the crate brings a bindgen-generated
//! `-sys` crate and its own error type, and its `copy` hides the partial-copy result that
//! post-copy needs (a multi-page UFFDIO_COPY stops at the first page that is already there
//! and reports how far it got; we skip that page and continue).
//!
//! Constants and structures are Linux's `<linux/userfaultfd.h>` (x86-64 and aarch64 share
//! them: the ioctl numbers encode only direction, size, type 0xAA and number).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use thiserror::Error;

const UFFD_API: u64 = 0xAA;
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

const fn iowr(nr: u64, size: u64) -> u64 {
    (3 << 30) | (size << 16) | (0xAA << 8) | nr
}
const fn ior(nr: u64, size: u64) -> u64 {
    (2 << 30) | (size << 16) | (0xAA << 8) | nr
}

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}
#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}
#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

const UFFDIO_API: u64 = iowr(0x3F, std::mem::size_of::<UffdioApi>() as u64);
const UFFDIO_REGISTER: u64 = iowr(0x00, std::mem::size_of::<UffdioRegister>() as u64);
const UFFDIO_UNREGISTER: u64 = ior(0x01, std::mem::size_of::<UffdioRange>() as u64);
const UFFDIO_WAKE: u64 = ior(0x02, std::mem::size_of::<UffdioRange>() as u64);
const UFFDIO_COPY: u64 = iowr(0x03, std::mem::size_of::<UffdioCopy>() as u64);
/// `struct uffd_msg` is 32 bytes: event u8 @0, then for a page fault flags u64 @8 and
/// address u64 @16.
const MSG_LEN: usize = 32;

/// Errors of the userfaultfd layer.
#[derive(Debug, Error)]
pub enum UffdError {
    #[error("userfaultfd: cannot create (needs CAP_SYS_PTRACE, or vm.unprivileged_userfaultfd, or a kernel with UFFD_USER_MODE_ONLY): {0}")]
    Create(#[source] io::Error),
    #[error("userfaultfd: API handshake: {0}")]
    Api(#[source] io::Error),
    #[error("userfaultfd: registering {len} bytes at {start:#x} in missing mode (anonymous or shared memory only): {source}")]
    Register {
        start: u64,
        len: u64,
        source: io::Error,
    },
    #[error("userfaultfd: placing {len} bytes at {dst:#x}: {source}")]
    Copy {
        dst: u64,
        len: u64,
        source: io::Error,
    },
    #[error("userfaultfd: waking {len} bytes at {start:#x}: {source}")]
    Wake {
        start: u64,
        len: u64,
        source: io::Error,
    },
    #[error("userfaultfd: reading fault events: {0}")]
    Read(#[source] io::Error),
    #[error("discarding {len} bytes at {start:#x}: {source}")]
    Discard {
        start: u64,
        len: u64,
        source: io::Error,
    },
}

/// What a [`Uffd::copy`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Placed {
    /// Bytes this call placed.
    pub copied: usize,
    /// Bytes that were already present (placed earlier by someone else): not an error.
    pub existed: usize,
}

/// A userfaultfd file descriptor (non-blocking, close-on-exec), API handshake done.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    user_mode_only: bool,
}

impl Uffd {
    /// Create one. Tries a full userfaultfd first (faults from the kernel too, e.g. KVM
    /// touching guest memory, need it; root has it), then `UFFD_USER_MODE_ONLY` (only faults
    /// from user space are reported; what unprivileged processes get on kernels ≥ 5.11).
    pub fn new() -> Result<Uffd, UffdError> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        let mut user_mode_only = false;
        // SAFETY: the userfaultfd system call takes an int of flags and returns a new fd or -1.
        let mut fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if fd < 0 {
            let first = io::Error::last_os_error();
            // SAFETY: as above.
            fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags | UFFD_USER_MODE_ONLY) };
            if fd < 0 {
                return Err(UffdError::Create(first));
            }
            user_mode_only = true;
        }
        let fd = i32::try_from(fd).map_err(|_| UffdError::Create(io::Error::other("bad fd")))?;
        // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut api = UffdioApi {
            api: UFFD_API,
            ..Default::default()
        };
        // SAFETY: UFFDIO_API reads and writes one `struct uffdio_api`, which `api` is (repr C,
        // same layout), valid for the call.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) };
        if r < 0 {
            return Err(UffdError::Api(io::Error::last_os_error()));
        }
        Ok(Uffd { fd, user_mode_only })
    }

    /// Whether only user-space faults are reported (see [`Uffd::new`]).
    pub fn user_mode_only(&self) -> bool {
        self.user_mode_only
    }

    /// Register `start..start + len` in missing mode: from now on a thread touching a page
    /// there that is not present blocks until the page is placed ([`Uffd::copy`]) or woken.
    ///
    /// # Safety
    /// The range must be a mapping of this process (anonymous or shared memory) that stays
    /// mapped while registered, and whose missing pages the caller undertakes to place: a
    /// thread touching one waits until then.
    pub unsafe fn register(&self, start: *mut u8, len: usize) -> Result<(), UffdError> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: start as u64,
                len: len as u64,
            },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads/writes one `struct uffdio_register` (`reg`, repr C);
        // the caller vouches for the range.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut reg) };
        if r < 0 {
            return Err(UffdError::Register {
                start: start as u64,
                len: len as u64,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Undo [`Uffd::register`] (closing the fd does it too). Missing pages then fill with
    /// zeros on touch, so only call this once every page has been placed.
    pub fn unregister(&self, start: *mut u8, len: usize) -> Result<(), UffdError> {
        let mut range = UffdioRange {
            start: start as u64,
            len: len as u64,
        };
        // SAFETY: UFFDIO_UNREGISTER reads one `struct uffdio_range` (`range`, repr C). It
        // changes no memory contents.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER as _, &mut range) };
        if r < 0 {
            return Err(UffdError::Register {
                start: start as u64,
                len: len as u64,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Wait up to `timeout` for page faults; appends the faulting addresses to `out` and
    /// returns how many were read (0 on timeout). Never blocks longer than `timeout`; returns
    /// at once (with what is there) when `wake` is signalled.
    pub fn read_faults(
        &self,
        timeout: Duration,
        out: &mut Vec<u64>,
        wake: Option<&Wakeup>,
    ) -> Result<usize, UffdError> {
        let mut pfd = [
            libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: wake.map_or(-1, |w| w.fd.as_raw_fd()),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: two valid pollfds for the duration of the call (a negative fd is ignored).
        let r = unsafe { libc::poll(pfd.as_mut_ptr(), 2, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(UffdError::Read(e));
        }
        if r == 0 || pfd[0].revents & libc::POLLIN == 0 {
            return Ok(0);
        }
        let mut buf = [0u8; MSG_LEN * 32];
        // SAFETY: reads at most buf.len() bytes into our own buffer.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
            ) {
                return Ok(0);
            }
            return Err(UffdError::Read(e));
        }
        let mut count = 0;
        for msg in buf
            .get(..n as usize)
            .unwrap_or_default()
            .chunks_exact(MSG_LEN)
        {
            if msg.first() != Some(&UFFD_EVENT_PAGEFAULT) {
                continue; // no other event was asked for (features 0)
            }
            if let Some(a) = msg.get(16..24).and_then(|b| b.try_into().ok()) {
                out.push(u64::from_ne_bytes(a));
                count += 1;
            }
        }
        Ok(count)
    }

    /// Place `src` at `dst` atomically (UFFDIO_COPY) and wake the threads waiting there.
    /// `src.len()` must be a multiple of `page_size`. Pages already present are skipped and
    /// counted in [`Placed::existed`], not reported as errors.
    ///
    /// # Safety
    /// `dst..dst + src.len()` must lie inside a range registered with this fd.
    pub unsafe fn copy(
        &self,
        dst: *mut u8,
        src: &[u8],
        page_size: usize,
    ) -> Result<Placed, UffdError> {
        let mut done = Placed::default();
        let len = src.len();
        let mut pos = 0usize;
        while pos < len {
            let mut c = UffdioCopy {
                dst: dst as u64 + pos as u64,
                src: src.as_ptr() as u64 + pos as u64,
                len: (len - pos) as u64,
                mode: 0,
                copy: 0,
            };
            // SAFETY: UFFDIO_COPY reads `src` (our slice, readable for its whole length) and
            // writes the registered destination the caller vouches for; `c` is a repr(C)
            // `struct uffdio_copy` valid for the call.
            let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY as _, &mut c) };
            if r == 0 {
                let n = usize::try_from(c.copy).unwrap_or(0);
                if n == 0 {
                    return Err(UffdError::Copy {
                        dst: c.dst,
                        len: c.len,
                        source: io::Error::other("kernel copied nothing"),
                    });
                }
                done.copied += n;
                pos += n;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EEXIST) => {
                    // Pages before the existing one (if any) were placed; that one is there.
                    let n = usize::try_from(c.copy).unwrap_or(0);
                    done.copied += n;
                    pos += n;
                    done.existed += page_size.min(len - pos);
                    pos += page_size;
                }
                Some(libc::EAGAIN) => {
                    let n = usize::try_from(c.copy).unwrap_or(0);
                    done.copied += n;
                    pos += n;
                }
                _ => {
                    return Err(UffdError::Copy {
                        dst: c.dst,
                        len: c.len,
                        source: e,
                    })
                }
            }
        }
        Ok(done)
    }

    /// Wake threads waiting on `start..start + len` (the pages must be present, or they
    /// fault again).
    pub fn wake(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut range = UffdioRange { start, len };
        // SAFETY: UFFDIO_WAKE reads one `struct uffdio_range`; it changes no memory.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE as _, &mut range) };
        if r < 0 {
            return Err(UffdError::Wake {
                start,
                len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

/// A wake-up for a thread waiting in [`Uffd::read_faults`] (an eventfd): once signalled it
/// stays readable, so every later wait returns at once too.
#[derive(Debug)]
pub struct Wakeup {
    fd: OwnedFd,
}

impl Wakeup {
    /// A new, unsignalled wake-up.
    pub fn new() -> io::Result<Wakeup> {
        // SAFETY: eventfd takes an initial value and flags and returns a new fd or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Wakeup { fd })
    }

    /// Signal it.
    pub fn wake(&self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from our buffer to our eventfd (a full counter is harmless:
        // it is readable either way).
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    }
}

/// Drop the contents of `start..start + len` so the pages are missing again: shared memory
/// has its backing removed (MADV_REMOVE), private anonymous memory is unmapped page by page
/// (MADV_DONTNEED).
///
/// # Safety
/// The range must be a mapping of this process whose contents nobody needs any more.
pub unsafe fn discard(start: *mut u8, len: usize) -> Result<(), UffdError> {
    // SAFETY: the caller vouches for the range; madvise changes only its contents.
    let r = unsafe { libc::madvise(start.cast(), len, libc::MADV_REMOVE) };
    if r == 0 {
        return Ok(());
    }
    // SAFETY: as above.
    let r = unsafe { libc::madvise(start.cast(), len, libc::MADV_DONTNEED) };
    if r < 0 {
        return Err(UffdError::Discard {
            start: start as u64,
            len: len as u64,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;
    use crate::memory::Block;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    fn memfd_block(name: &str, size: usize) -> Block {
        let cname = std::ffi::CString::new(name).unwrap();
        // SAFETY: a valid C string; returns a new fd or -1.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd is new and ours.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        file.set_len(size as u64).unwrap();
        Block::from_file(name, &file, true, false).unwrap()
    }

    /// A thread touches a missing page; the fault is read, the page placed, the thread sees
    /// exactly the placed bytes. Placing it again is "existed", not an error.
    fn fault_then_place(block: Block) {
        let uffd = Arc::new(Uffd::new().unwrap());
        let ps = 4096;
        let base = block.as_ptr();
        // SAFETY: the block is ours, mapped for the test, and every touched page is placed.
        unsafe { uffd.register(base, block.len()).unwrap() };
        let addr = base as usize + 3 * ps;
        let reader = std::thread::spawn(move || {
            // SAFETY: inside the block; the read blocks until the page is placed.
            unsafe { std::ptr::read_volatile((addr + 100) as *const u8) }
        });
        let mut faults = Vec::new();
        while faults.is_empty() {
            uffd.read_faults(Duration::from_secs(5), &mut faults, None)
                .unwrap();
        }
        assert_eq!(faults[0] & !(ps as u64 - 1), addr as u64);
        let page: Vec<u8> = (0..ps).map(|i| (i % 251) as u8).collect();
        // SAFETY: inside the registered block.
        let p = unsafe { uffd.copy(addr as *mut u8, &page, ps) }.unwrap();
        assert_eq!(
            p,
            Placed {
                copied: ps,
                existed: 0
            }
        );
        assert_eq!(reader.join().unwrap(), 100);
        // Pages 2..6 in one call: page 3 exists, the others are placed.
        let four = vec![9u8; 4 * ps];
        // SAFETY: inside the registered block.
        let p = unsafe { uffd.copy(base.wrapping_add(2 * ps), &four, ps) }.unwrap();
        assert_eq!(
            p,
            Placed {
                copied: 3 * ps,
                existed: ps
            }
        );
        // SAFETY: pages 2..6 are placed; nothing writes them.
        let s = unsafe { std::slice::from_raw_parts(base.wrapping_add(2 * ps), 4 * ps) };
        assert!(s[..ps].iter().all(|&b| b == 9));
        assert_eq!(&s[ps..2 * ps], &page[..]);
        assert!(s[2 * ps..].iter().all(|&b| b == 9));
        uffd.wake(addr as u64, ps as u64).unwrap();
        // No fault is pending: read_faults times out rather than hanging.
        let mut more = Vec::new();
        assert_eq!(
            uffd.read_faults(Duration::from_millis(20), &mut more, None)
                .unwrap(),
            0
        );
        // A wake-up ends a long wait at once.
        let w = Wakeup::new().unwrap();
        w.wake();
        let t = std::time::Instant::now();
        assert_eq!(
            uffd.read_faults(Duration::from_secs(10), &mut more, Some(&w))
                .unwrap(),
            0
        );
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn anonymous_memory_fault_and_place() {
        fault_then_place(Block::anonymous("a", 16 * 4096).unwrap());
    }

    #[test]
    fn shared_memory_fault_and_place() {
        fault_then_place(memfd_block("s", 16 * 4096));
    }

    #[test]
    fn discard_makes_pages_missing_again() {
        for block in [
            Block::anonymous("a", 8 * 4096).unwrap(),
            memfd_block("s", 8 * 4096),
        ] {
            // SAFETY: the block is new and ours.
            unsafe { block.as_mut_slice().fill(5) };
            // SAFETY: ours; its contents are not needed.
            unsafe { discard(block.as_ptr(), block.len()).unwrap() };
            let uffd = Uffd::new().unwrap();
            // SAFETY: ours, and every touched page is placed below.
            unsafe { uffd.register(block.as_ptr(), block.len()).unwrap() };
            let touched = Arc::new(AtomicBool::new(false));
            let t = touched.clone();
            let addr = block.as_ptr() as usize;
            let h = std::thread::spawn(move || {
                // SAFETY: inside the block; blocks until placed.
                let v = unsafe { std::ptr::read_volatile(addr as *const u8) };
                t.store(true, Ordering::SeqCst);
                v
            });
            let mut f = Vec::new();
            while f.is_empty() {
                uffd.read_faults(Duration::from_secs(5), &mut f, None)
                    .unwrap();
            }
            assert!(
                !touched.load(Ordering::SeqCst),
                "the reader waited for the page"
            );
            // SAFETY: inside the registered block.
            unsafe { uffd.copy(block.as_ptr(), &[1u8; 4096], 4096) }.unwrap();
            assert_eq!(h.join().unwrap(), 1);
        }
    }
}

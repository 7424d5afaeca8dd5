//! Intel QPL (Query Processing Library) bindings, loaded at run time.
//!
//! No build-time dependency on QPL: [`Qpl::load`] opens `libqpl.so.1` with `dlopen` (via
//! libloading) the first time it is asked for, so one binary runs on hosts with and without
//! QPL, and code that never asks for QPL never touches it.
//!
//! Only what pagewire uses is bound: the job functions, the job's public fields it sets or
//! reads, and the constants below (values and offsets checked against QPL 1.6.0's `qpl.h` on
//! x86-64; `tests/header_probe.rs` re-checks them against the installed header when
//! pkg-config finds `qpl`).
//!
//! [`Job`] is the safe owner of one job: allocated at `qpl_get_job_size` bytes, zeroed,
//! initialised in place and never moved afterwards (QPL stores pointers into it), finalised
//! with `qpl_fini_job` on drop.
//!
//! Facts of the software path worth knowing (measured with QPL 1.6.0): `qpl_submit_job`
//! runs the job synchronously and its return value is the job's status; `qpl_check_job` and
//! `qpl_wait_job` then return OK whatever happened (they only look at hardware jobs), so the
//! submit status is the one that counts there.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ffi::{c_char, CStr};
use std::ptr::NonNull;
use std::sync::OnceLock;

use thiserror::Error;

/// `qpl_status`: a 4-byte C enum, kept a plain integer.
pub type Status = u32;

/// `qpl_path_t` values.
pub mod path {
    pub const AUTO: u32 = 0;
    pub const HARDWARE: u32 = 1;
    pub const SOFTWARE: u32 = 2;
}

/// `qpl_operation` values.
pub mod op {
    pub const DECOMPRESS: u32 = 0;
    pub const COMPRESS: u32 = 1;
}

/// `QPL_FLAG_*` values.
pub mod flag {
    pub const FIRST: u32 = 0x1;
    pub const LAST: u32 = 0x2;
    pub const DYNAMIC_HUFFMAN: u32 = 0x2000;
    pub const OMIT_VERIFY: u32 = 0x4000;
}

/// `qpl_compression_levels` values.
pub mod level {
    pub const DEFAULT: u32 = 1;
    /// Software path only.
    pub const HIGH: u32 = 3;
}

/// `qpl_status` values used by pagewire.
pub mod status {
    use super::Status;
    pub const OK: Status = 0;
    pub const BEING_PROCESSED: Status = 1;
    /// The answer to a compression whose output does not fit.
    pub const MORE_OUTPUT_NEEDED: Status = 2;
    pub const QUEUES_ARE_BUSY_ERR: Status = 5;
    pub const UNSUPPORTED_COMPRESSION_LEVEL: Status = 87;
    pub const INIT_HW_NOT_SUPPORTED: Status = 500;
    pub const INIT_LIBACCEL_NOT_FOUND: Status = 501;
    pub const INIT_LIBACCEL_ERROR: Status = 502;
    pub const INIT_WORK_QUEUES_NOT_AVAILABLE: Status = 503;
}

/// Byte offsets of the public `qpl_job` fields pagewire uses.
pub mod offset {
    pub const NEXT_IN_PTR: usize = 0;
    pub const AVAILABLE_IN: usize = 8;
    pub const TOTAL_IN: usize = 12;
    pub const NEXT_OUT_PTR: usize = 16;
    pub const AVAILABLE_OUT: usize = 24;
    pub const TOTAL_OUT: usize = 28;
    pub const OP: usize = 32;
    pub const FLAGS: usize = 36;
    pub const LEVEL: usize = 52;
    /// `sizeof(qpl_job)` as the header declares it; jobs are allocated at
    /// `qpl_get_job_size` bytes, which is larger.
    pub const PUBLIC_SIZE: usize = 240;
}

/// The library file name.
pub const LIBRARY: &str = "libqpl.so.1";

/// Errors of the QPL layer.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum QplError {
    /// libqpl.so.1 could not be loaded.
    #[error(
        "{LIBRARY} was not found or could not be loaded ({detail}); install Intel QPL \
         (https://intel.github.io/qpl/, build with -DQPL_LIBRARY_TYPE=SHARED) and put its lib \
         directory on LD_LIBRARY_PATH, or set PAGEWIRE_LIBQPL to the library's path"
    )]
    NotFound { detail: String },
    /// A symbol is missing from the library.
    #[error("{LIBRARY} lacks symbol {symbol} (QPL too old?)")]
    MissingSymbol { symbol: &'static str },
    /// A QPL call returned a failure status.
    #[error("{call} returned QPL status {status} ({})", status_name(*status))]
    Status { call: &'static str, status: Status },
    /// The job size QPL asked for cannot be allocated.
    #[error("cannot allocate a QPL job of {size} bytes")]
    Alloc { size: usize },
}

/// A readable name for a status.
pub fn status_name(s: Status) -> &'static str {
    match s {
        status::OK => "OK",
        status::BEING_PROCESSED => "BEING_PROCESSED",
        status::MORE_OUTPUT_NEEDED => "MORE_OUTPUT_NEEDED",
        status::QUEUES_ARE_BUSY_ERR => "QUEUES_ARE_BUSY_ERR",
        status::UNSUPPORTED_COMPRESSION_LEVEL => "UNSUPPORTED_COMPRESSION_LEVEL",
        status::INIT_HW_NOT_SUPPORTED => "INIT_HW_NOT_SUPPORTED",
        status::INIT_LIBACCEL_NOT_FOUND => {
            "INIT_LIBACCEL_NOT_FOUND (no accel-config library: no IAA)"
        }
        status::INIT_LIBACCEL_ERROR => "INIT_LIBACCEL_ERROR",
        status::INIT_WORK_QUEUES_NOT_AVAILABLE => {
            "INIT_WORK_QUEUES_NOT_AVAILABLE (no IAA work queue)"
        }
        _ => "see qpl_status in qpl.h",
    }
}

type JobFn = unsafe extern "C" fn(*mut u8) -> Status;
type InitFn = unsafe extern "C" fn(u32, *mut u8) -> Status;
type SizeFn = unsafe extern "C" fn(u32, *mut u32) -> Status;
type VersionFn = unsafe extern "C" fn() -> *const c_char;

/// The loaded library and its entry points.
pub struct Qpl {
    _lib: libloading::Library,
    get_job_size: SizeFn,
    init_job: InitFn,
    execute_job: JobFn,
    submit_job: JobFn,
    check_job: JobFn,
    wait_job: JobFn,
    fini_job: JobFn,
    get_library_version: VersionFn,
}

impl std::fmt::Debug for Qpl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qpl")
            .field("version", &self.version())
            .finish()
    }
}

static LOADED: OnceLock<Result<Qpl, QplError>> = OnceLock::new();

impl Qpl {
    /// Load `libqpl.so.1` (or the file `PAGEWIRE_LIBQPL` names) once per process.
    pub fn load() -> Result<&'static Qpl, QplError> {
        LOADED.get_or_init(Qpl::open).as_ref().map_err(Clone::clone)
    }

    fn open() -> Result<Qpl, QplError> {
        let name = std::env::var_os("PAGEWIRE_LIBQPL").unwrap_or_else(|| LIBRARY.into());
        // SAFETY: loading QPL runs its ELF constructors; QPL's are plain C++ static
        // initialisers with no preconditions on the caller.
        let lib = unsafe { libloading::Library::new(&name) }.map_err(|e| QplError::NotFound {
            detail: e.to_string(),
        })?;
        macro_rules! sym {
            ($name:literal, $ty:ty) => {{
                // SAFETY: the symbol is QPL's C function of exactly this signature (qpl.h,
                // checked by tests/header_probe.rs); the pointer stays valid while `lib`
                // lives, and `lib` lives in the same struct as the pointer.
                let got = unsafe { lib.get(concat!($name, "\0").as_bytes()) };
                let s: libloading::Symbol<'_, $ty> =
                    got.map_err(|_| QplError::MissingSymbol { symbol: $name })?;
                *s
            }};
        }
        let q = Qpl {
            get_job_size: sym!("qpl_get_job_size", SizeFn),
            init_job: sym!("qpl_init_job", InitFn),
            execute_job: sym!("qpl_execute_job", JobFn),
            submit_job: sym!("qpl_submit_job", JobFn),
            check_job: sym!("qpl_check_job", JobFn),
            wait_job: sym!("qpl_wait_job", JobFn),
            fini_job: sym!("qpl_fini_job", JobFn),
            get_library_version: sym!("qpl_get_library_version", VersionFn),
            _lib: lib,
        };
        Ok(q)
    }

    /// QPL's version string, e.g. "1.6.0".
    pub fn version(&self) -> String {
        // SAFETY: qpl_get_library_version takes nothing and returns a pointer to a static
        // NUL-terminated string (or null, handled).
        let p = unsafe { (self.get_library_version)() };
        if p.is_null() {
            return "unknown".into();
        }
        // SAFETY: non-null, NUL-terminated, static (QPL's contract).
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    /// Bytes a job on `path` needs.
    pub fn job_size(&self, path: u32) -> Result<usize, QplError> {
        let mut size = 0u32;
        // SAFETY: `size` is a valid u32 to write.
        let st = unsafe { (self.get_job_size)(path, &mut size) };
        if st != status::OK {
            return Err(QplError::Status {
                call: "qpl_get_job_size",
                status: st,
            });
        }
        Ok(size as usize)
    }
}

/// What a job does: operation, flags and level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Operation {
    /// `op::COMPRESS` or `op::DECOMPRESS`.
    pub op: u32,
    /// `flag::*` bits.
    pub flags: u32,
    /// `level::*`.
    pub level: u32,
}

/// One QPL job, owned: allocated at `qpl_get_job_size` bytes, initialised in place, never
/// moved (the allocation is on the heap and only this handle points at it), finalised and
/// freed on drop.
pub struct Job {
    qpl: &'static Qpl,
    ptr: NonNull<u8>,
    layout: Layout,
    path: u32,
}

// SAFETY: a job is plain memory owned by this handle; QPL keeps no thread affinity for jobs
// (a job may be submitted on one thread and checked on another as long as calls do not
// overlap, which `&mut self` guarantees).
unsafe impl Send for Job {}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("path", &self.path)
            .field("size", &self.layout.size())
            .finish()
    }
}

impl Job {
    /// Allocate and initialise a job on `path` (`path::HARDWARE` fails with status 501 or
    /// 503 where there is no IAA: that is how hardware is detected).
    pub fn new(qpl: &'static Qpl, path: u32) -> Result<Job, QplError> {
        let size = qpl.job_size(path)?.max(offset::PUBLIC_SIZE);
        let layout = Layout::from_size_align(size, 64).map_err(|_| QplError::Alloc { size })?;
        // SAFETY: `layout` has a non-zero size.
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) }).ok_or(QplError::Alloc { size })?;
        // SAFETY: `ptr` is a zeroed allocation of the size QPL asked for, aligned to 64.
        let st = unsafe { (qpl.init_job)(path, ptr.as_ptr()) };
        if st != status::OK {
            // SAFETY: allocated above with `layout`; init failed so QPL holds nothing in it.
            unsafe { dealloc(ptr.as_ptr(), layout) };
            return Err(QplError::Status {
                call: "qpl_init_job",
                status: st,
            });
        }
        Ok(Job {
            qpl,
            ptr,
            layout,
            path,
        })
    }

    /// The path this job was initialised on.
    pub fn path(&self) -> u32 {
        self.path
    }

    fn write_u32(&mut self, at: usize, v: u32) {
        debug_assert!(at + 4 <= offset::PUBLIC_SIZE);
        // SAFETY: `at + 4 <= 240 <= allocation size`; write_unaligned needs no alignment.
        unsafe { self.ptr.as_ptr().add(at).cast::<u32>().write_unaligned(v) }
    }

    fn read_u32(&self, at: usize) -> u32 {
        // SAFETY: as for write_u32.
        unsafe { self.ptr.as_ptr().add(at).cast::<u32>().read_unaligned() }
    }

    fn write_ptr(&mut self, at: usize, p: *const u8) {
        // SAFETY: `at + 8 <= 240 <= allocation size`.
        unsafe {
            self.ptr
                .as_ptr()
                .add(at)
                .cast::<*const u8>()
                .write_unaligned(p)
        }
    }

    /// Prepare a job: operation, flags, level, input and output buffers.
    ///
    /// # Safety
    /// `input..input+in_len` must be readable and `output..output+out_len` writable, and
    /// both must stay valid and otherwise unused until the job has completed (its status
    /// from [`Job::submit`] on the software path, or [`Job::check`] no longer answering
    /// BEING_PROCESSED on the hardware path).
    pub unsafe fn prepare(
        &mut self,
        what: Operation,
        input: *const u8,
        in_len: u32,
        output: *mut u8,
        out_len: u32,
    ) {
        let Operation { op, flags, level } = what;
        self.write_u32(offset::OP, op);
        self.write_u32(offset::FLAGS, flags);
        self.write_u32(offset::LEVEL, level);
        self.write_ptr(offset::NEXT_IN_PTR, input);
        self.write_u32(offset::AVAILABLE_IN, in_len);
        self.write_ptr(offset::NEXT_OUT_PTR, output);
        self.write_u32(offset::AVAILABLE_OUT, out_len);
        self.write_u32(offset::TOTAL_IN, 0);
        self.write_u32(offset::TOTAL_OUT, 0);
    }

    /// `qpl_submit_job`. On the software path this runs the job and returns its status.
    pub fn submit(&mut self) -> Status {
        // SAFETY: the job is initialised; its buffers are valid per `prepare`'s contract.
        unsafe { (self.qpl.submit_job)(self.ptr.as_ptr()) }
    }

    /// `qpl_check_job`: BEING_PROCESSED while a hardware job runs.
    pub fn check(&mut self) -> Status {
        // SAFETY: the job is initialised.
        unsafe { (self.qpl.check_job)(self.ptr.as_ptr()) }
    }

    /// `qpl_wait_job`: blocks until the job completes.
    pub fn wait(&mut self) -> Status {
        // SAFETY: the job is initialised.
        unsafe { (self.qpl.wait_job)(self.ptr.as_ptr()) }
    }

    /// `qpl_execute_job`: submit and wait.
    pub fn execute(&mut self) -> Status {
        // SAFETY: the job is initialised; buffers per `prepare`'s contract.
        unsafe { (self.qpl.execute_job)(self.ptr.as_ptr()) }
    }

    /// Bytes produced by the last job.
    pub fn total_out(&self) -> u32 {
        self.read_u32(offset::TOTAL_OUT)
    }

    /// Bytes consumed by the last job.
    pub fn total_in(&self) -> u32 {
        self.read_u32(offset::TOTAL_IN)
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        // SAFETY: initialised by qpl_init_job and not finalised yet; after fini QPL holds no
        // reference into the allocation, which is then freed with the layout it came from.
        unsafe {
            (self.qpl.fini_job)(self.ptr.as_ptr());
            dealloc(self.ptr.as_ptr(), self.layout);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names() {
        assert_eq!(
            status_name(status::MORE_OUTPUT_NEEDED),
            "MORE_OUTPUT_NEEDED"
        );
        assert!(status_name(503).contains("work queue"));
        assert!(status_name(12345).contains("qpl.h"));
    }

    #[test]
    fn software_round_trip_when_installed() {
        let qpl = match Qpl::load() {
            Ok(q) => q,
            Err(e) => {
                eprintln!("SKIP software_round_trip_when_installed: {e}");
                return;
            }
        };
        let mut page = vec![0u8; 4096];
        for (i, b) in page.iter_mut().enumerate() {
            *b = b"the quick brown fox jumps over the lazy dog "[i % 44];
        }
        let mut out = vec![0u8; 4095];
        let mut job = Job::new(qpl, path::SOFTWARE).expect("software job");
        for flags in [
            flag::FIRST | flag::LAST | flag::OMIT_VERIFY,
            flag::FIRST | flag::LAST | flag::OMIT_VERIFY | flag::DYNAMIC_HUFFMAN,
        ] {
            // SAFETY: buffers live until the synchronous software job returned.
            unsafe {
                job.prepare(
                    Operation {
                        op: op::COMPRESS,
                        flags,
                        level: level::DEFAULT,
                    },
                    page.as_ptr(),
                    4096,
                    out.as_mut_ptr(),
                    4095,
                )
            };
            assert_eq!(job.submit(), status::OK);
            let n = job.total_out() as usize;
            assert!(n > 0 && n < 4095);
            let mut back = vec![0u8; 4096];
            // SAFETY: as above.
            unsafe {
                job.prepare(
                    Operation {
                        op: op::DECOMPRESS,
                        flags: flag::FIRST | flag::LAST,
                        level: level::DEFAULT,
                    },
                    out.as_ptr(),
                    n as u32,
                    back.as_mut_ptr(),
                    4096,
                )
            };
            assert_eq!(job.submit(), status::OK);
            assert_eq!(job.total_out(), 4096);
            assert_eq!(back, page);
        }
        // Hardware detection: fails cleanly without IAA.
        match Job::new(qpl, path::HARDWARE) {
            Ok(_) => eprintln!("note: an IAA hardware job initialised on this host"),
            Err(QplError::Status { status, .. }) => {
                assert!((500..=503).contains(&status), "{status}")
            }
            Err(e) => panic!("{e}"),
        }
    }
}

//! Every thread pagewire starts, started one way: named after its role (`pw-send-0`,
//! `pw-pc-faults`, …) and running the embedder's [`ThreadHook`] before anything else, so a
//! VMM that sandboxes each of its threads (seccomp, as cloud-hypervisor and Firecracker do)
//! can install its filter on pagewire's threads too. The system calls each role makes are in
//! [`crate::sandbox`].
//!
//! The hook runs on the new thread, before it touches a socket or guest memory. If it fails,
//! the thread does nothing else and the call that wanted it fails with
//! [`SessionError::Thread`](crate::SessionError::Thread): no pagewire code runs
//! outside the sandbox the embedder asked for.

use std::any::Any;
use std::error::Error as StdError;
use std::fmt;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::{JoinHandle, Scope, ScopedJoinHandle};

/// What a pagewire thread does; the hook may choose its filter by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ThreadRole {
    /// A sender's channel loop (`pw-send-N`): compresses and sends pages with io_uring.
    SendChannel,
    /// A receiver's channel loop (`pw-recv`): receives pages with io_uring into guest memory.
    RecvChannel,
    /// The receiver's front door (`pw-door`): accepts connections for the whole `serve`.
    Door,
    /// One connection's handshake (`pw-handshake`): preamble, hello, TLS handshake.
    Handshake,
    /// The receiver's commit callback at the session's end (`pw-commit`).
    Commit,
    /// A post-copy source connection (`pw-pc-urgent`, `pw-pc-bg-N`).
    PostcopySend,
    /// A post-copy destination connection's reader (`pw-pc-recv-N`).
    PostcopyRecv,
    /// The post-copy destination's fault thread (`pw-pc-faults`): reads userfaultfd.
    PostcopyFaults,
}

impl ThreadRole {
    /// Every role, for embedders building one filter per role.
    pub const ALL: [ThreadRole; 8] = [
        ThreadRole::SendChannel,
        ThreadRole::RecvChannel,
        ThreadRole::Door,
        ThreadRole::Handshake,
        ThreadRole::Commit,
        ThreadRole::PostcopySend,
        ThreadRole::PostcopyRecv,
        ThreadRole::PostcopyFaults,
    ];
}

/// The thread being started, as the hook sees it.
#[derive(Clone, Copy, Debug)]
pub struct ThreadStart<'a> {
    /// Its name (also the OS thread name, as `ps -L` shows it).
    pub name: &'a str,
    /// What it does.
    pub role: ThreadRole,
}

/// What a hook may fail with.
pub type HookError = Box<dyn StdError + Send + Sync>;

type HookFn = dyn Fn(&ThreadStart<'_>) -> Result<(), HookError> + Send + Sync;

/// The embedder's callback, run first on every thread pagewire starts
/// ([`SenderConfig::threads`](crate::SenderConfig::threads), [`ReceiverConfig::threads`](crate::ReceiverConfig::threads)). The default runs nothing.
///
/// ```
/// use pagewire::threads::{ThreadHook, ThreadRole};
/// let hook = ThreadHook::new(|t| {
///     // Install this role's seccomp filter here (seccompiler::apply_filter).
///     assert!(t.name.starts_with("pw-"));
///     let _filter_for = t.role;
///     Ok(())
/// });
/// let cfg = pagewire::SenderConfig::default().threads(hook);
/// # let _ = cfg;
/// ```
#[derive(Clone, Default)]
pub struct ThreadHook(Option<Arc<HookFn>>);

impl ThreadHook {
    /// A hook running `f` first on every pagewire thread.
    pub fn new<F>(f: F) -> ThreadHook
    where
        F: Fn(&ThreadStart<'_>) -> Result<(), HookError> + Send + Sync + 'static,
    {
        ThreadHook(Some(Arc::new(f)))
    }

    fn run(&self, start: &ThreadStart<'_>) -> Result<(), HookError> {
        match &self.0 {
            Some(f) => f(start),
            None => Ok(()),
        }
    }
}

impl fmt::Debug for ThreadHook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "ThreadHook(set)"
        } else {
            "ThreadHook(none)"
        })
    }
}

/// A thread could not be started: the OS refused, or the hook failed on it.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The OS could not create the thread.
    #[error("cannot start thread {name}: {source}")]
    Os {
        /// The thread's name.
        name: String,
        /// The OS's error.
        #[source]
        source: std::io::Error,
    },
    /// The embedder's hook failed on the new thread; it ran nothing else.
    #[error("the thread hook failed on {name}: {source}")]
    Hook {
        /// The thread's name.
        name: String,
        /// The hook's error.
        #[source]
        source: HookError,
    },
}

/// A started thread; `join` as with [`JoinHandle`].
#[derive(Debug)]
pub(crate) struct Thread<T>(JoinHandle<Option<T>>);

impl<T> Thread<T> {
    pub(crate) fn join(self) -> std::thread::Result<T> {
        self.0.join().and_then(not_skipped)
    }
}

/// A started scoped thread; `join` as with [`ScopedJoinHandle`].
#[derive(Debug)]
pub(crate) struct ScopedThread<'scope, T>(ScopedJoinHandle<'scope, Option<T>>);

impl<T> ScopedThread<'_, T> {
    pub(crate) fn join(self) -> std::thread::Result<T> {
        self.0.join().and_then(not_skipped)
    }
}

/// A thread whose hook failed never ran its body; `spawn` reported that, so nobody holds a
/// handle to join it. Should one, it reads as a thread that did not finish.
fn not_skipped<T>(v: Option<T>) -> std::thread::Result<T> {
    v.ok_or_else(|| {
        Box::new("the thread hook failed; the thread did not run") as Box<dyn Any + Send>
    })
}

/// Runs the hook on the new thread, reports its outcome to the spawner and, if it held, the
/// body.
fn body<T>(
    hook: ThreadHook,
    name: String,
    role: ThreadRole,
    ready: mpsc::SyncSender<Result<(), HookError>>,
    f: impl FnOnce() -> T,
) -> Option<T> {
    let r = hook.run(&ThreadStart { name: &name, role });
    let ok = r.is_ok();
    // The spawner waits for this; it only goes away if it panicked.
    let _ = ready.send(r);
    ok.then(f)
}

fn wait_ready(
    name: String,
    ready: &mpsc::Receiver<Result<(), HookError>>,
) -> Result<(), SpawnError> {
    match ready.recv() {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(SpawnError::Hook { name, source }),
        // The hook panicked before reporting.
        Err(_) => Err(SpawnError::Hook {
            name,
            source: "the hook panicked".into(),
        }),
    }
}

/// Starts `f` on a new thread named `name` after `hook` held on it. `stack`: its stack size
/// (the default where `None`).
pub(crate) fn spawn<T, F>(
    hook: &ThreadHook,
    role: ThreadRole,
    name: String,
    stack: Option<usize>,
    f: F,
) -> Result<Thread<T>, SpawnError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = mpsc::sync_channel(1);
    let mut b = std::thread::Builder::new().name(name.clone());
    if let Some(s) = stack {
        b = b.stack_size(s);
    }
    let h = hook.clone();
    let n = name.clone();
    let handle = b
        .spawn(move || body(h, n, role, tx, f))
        .map_err(|source| SpawnError::Os {
            name: name.clone(),
            source,
        })?;
    wait_ready(name, &rx)?;
    Ok(Thread(handle))
}

/// [`spawn`] in a [`std::thread::scope`].
pub(crate) fn spawn_scoped<'scope, 'env, T, F>(
    scope: &'scope Scope<'scope, 'env>,
    hook: &ThreadHook,
    role: ThreadRole,
    name: String,
    f: F,
) -> Result<ScopedThread<'scope, T>, SpawnError>
where
    F: FnOnce() -> T + Send + 'scope,
    T: Send + 'scope,
{
    let (tx, rx) = mpsc::sync_channel(1);
    let h = hook.clone();
    let n = name.clone();
    let handle = std::thread::Builder::new()
        .name(name.clone())
        .spawn_scoped(scope, move || body(h, n, role, tx, f))
        .map_err(|source| SpawnError::Os {
            name: name.clone(),
            source,
        })?;
    wait_ready(name, &rx)?;
    Ok(ScopedThread(handle))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn the_hook_runs_first_on_the_named_thread() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let hook = ThreadHook::new(move |t| {
            let os_name = std::thread::current().name().map(str::to_owned);
            s.lock().unwrap().push((t.name.to_owned(), t.role, os_name));
            Ok(())
        });
        let t = spawn(&hook, ThreadRole::Door, "pw-door".into(), None, || 7).unwrap();
        assert_eq!(t.join().unwrap(), 7);
        let v = seen.lock().unwrap().clone();
        assert_eq!(
            v,
            vec![("pw-door".into(), ThreadRole::Door, Some("pw-door".into()))]
        );
    }

    #[test]
    fn a_failing_hook_runs_nothing_and_names_the_thread() {
        let ran = Arc::new(Mutex::new(false));
        let r = ran.clone();
        let hook = ThreadHook::new(|_| Err("filter refused".into()));
        let err = spawn(
            &hook,
            ThreadRole::SendChannel,
            "pw-send-3".into(),
            None,
            move || {
                *r.lock().unwrap() = true;
            },
        )
        .err()
        .unwrap();
        assert!(matches!(err, SpawnError::Hook { .. }));
        assert_eq!(
            err.to_string(),
            "the thread hook failed on pw-send-3: filter refused"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert!(!*ran.lock().unwrap(), "the body never ran");
        // Scoped too.
        std::thread::scope(|s| {
            let e = spawn_scoped(s, &hook, ThreadRole::RecvChannel, "pw-recv".into(), || ())
                .err()
                .unwrap();
            assert!(e.to_string().contains("pw-recv"), "{e}");
        });
    }
}

//! Pinning channel threads to cores: one engine thread per channel, each on its own core.

use std::io;

/// Where channel threads run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Pinning {
    /// Leave placement to the scheduler (the library's default: the embedding VMM decides).
    #[default]
    Off,
    /// Channel i on the i-th CPU this process may use (wrapping around).
    Auto,
    /// As `Auto`, counting from the last CPU: a receiver's default, so that a sender and a
    /// receiver on the same host (loopback tests, demos) start on different cores.
    AutoFromLast,
    /// Channel i on `cpus[i % cpus.len()]`.
    Cpus(Vec<usize>),
}

impl Pinning {
    /// The CPU channel `channel` should run on, if any.
    pub fn cpu_for(&self, channel: u16) -> Option<usize> {
        match self {
            Pinning::Off => None,
            Pinning::Auto | Pinning::AutoFromLast => {
                let cpus = allowed_cpus().ok()?;
                let i = channel as usize % cpus.len().max(1);
                let i = if *self == Pinning::AutoFromLast {
                    cpus.len().checked_sub(1 + i)?
                } else {
                    i
                };
                cpus.get(i).copied()
            }
            Pinning::Cpus(list) if list.is_empty() => None,
            Pinning::Cpus(list) => list.get(channel as usize % list.len()).copied(),
        }
    }
}

/// Give the calling thread the nice value `nice` (-20..=19; lower runs sooner and longer).
/// Post-copy's fault path uses it so that a requested page is not delayed behind the
/// background stream's threads; below 0 needs CAP_SYS_NICE (an error otherwise).
pub fn set_current_thread_nice(nice: i32) -> io::Result<()> {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() };
    // SAFETY: setpriority on this thread's own id changes only its scheduling weight.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The CPUs the calling thread may run on.
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is a plain bit array; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: CPU_ISSET reads the bit array only, for indices below CPU_SETSIZE.
    Ok((0..libc::CPU_SETSIZE as usize)
        .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
        .collect())
}

/// Pin the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    pin_current_thread_to(&[cpu])
}

/// Let the calling thread run on the CPUs `cpus` only (at least one).
pub fn pin_current_thread_to(cpus: &[usize]) -> io::Result<()> {
    if cpus.is_empty() {
        return Err(io::Error::other("no cpu given"));
    }
    // SAFETY: as above; CPU_SET writes one bit inside the set (indices checked below).
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::other(format!("cpu {cpu} out of range")));
        }
        // SAFETY: index checked against CPU_SETSIZE just above.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Where post-copy's threads run (both ends; empty lists: where the scheduler puts them).
///
/// A fault waits for a chain of thread wake-ups (destination: the fault thread, then the
/// urgent connection's reader, then the faulting vCPU; source: the urgent connection's
/// thread). Woken on a CPU that is busy moving the background stream, each waits for that
/// CPU: on a kernel without full preemption (`PREEMPT_NONE`, common on servers) until its
/// current kernel work (a socket receive, a UFFDIO_COPY, the network stack) ends, which is
/// milliseconds under a stream at full speed. Separate CPUs for the two remove that wait
/// (docs/benchmarks.md, "Post-copy": the fault p99 fell from about 3 ms to 0.2 ms); give the
/// vCPU threads CPUs other than `background` too. [`PostcopyCpus::split_allowed`] makes such
/// a placement from the CPUs this process may use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PostcopyCpus {
    /// CPUs of the fault path: the destination's fault thread and urgent-connection reader,
    /// the source's urgent-connection thread.
    pub fault_path: Vec<usize>,
    /// CPUs of the background stream's threads (sending or receiving).
    pub background: Vec<usize>,
}

impl PostcopyCpus {
    /// A placement for a host that gives the migration the CPUs this process may use: the
    /// fault path on the last of them, the background stream on the others (run the vCPU
    /// threads on the fault path's CPU or on CPUs outside this set). With fewer than two
    /// CPUs, or when they cannot be read, nothing is pinned. Both ends of a migration on one
    /// host choose the same CPUs, so each end's fault path is off both background streams.
    pub fn split_allowed() -> PostcopyCpus {
        Self::split(&allowed_cpus().unwrap_or_default())
    }

    /// [`PostcopyCpus::split_allowed`] over the CPUs `cpus`.
    pub fn split(cpus: &[usize]) -> PostcopyCpus {
        match cpus.split_last() {
            Some((&last, rest)) if !rest.is_empty() => PostcopyCpus {
                fault_path: vec![last],
                background: rest.to_vec(),
            },
            _ => PostcopyCpus::default(),
        }
    }
}

/// Confine the calling post-copy thread to `cpus` (nothing when empty), logging (not
/// failing) when the OS refuses.
pub(crate) fn apply_set(cpus: &[usize], what: &str) {
    if cpus.is_empty() {
        return;
    }
    match pin_current_thread_to(cpus) {
        Ok(()) => tracing::debug!(what, ?cpus, "pinned"),
        Err(e) => {
            tracing::warn!(what, ?cpus, error = %e, "could not pin post-copy thread; running unpinned")
        }
    }
}

/// Pin the calling channel thread as `p` says, logging (not failing) when the OS refuses.
pub(crate) fn apply(p: &Pinning, channel: u16) {
    if let Some(cpu) = p.cpu_for(channel) {
        match pin_current_thread(cpu) {
            Ok(()) => tracing::debug!(channel, cpu, "pinned"),
            Err(e) => {
                tracing::warn!(channel, cpu, error = %e, "could not pin channel thread; running unpinned")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices() {
        assert_eq!(Pinning::Off.cpu_for(3), None);
        assert_eq!(Pinning::Cpus(vec![4, 6]).cpu_for(3), Some(6));
        let cpus = allowed_cpus().expect("affinity");
        assert!(!cpus.is_empty());
        assert_eq!(Pinning::Auto.cpu_for(0), cpus.first().copied());
        assert_eq!(Pinning::AutoFromLast.cpu_for(0), cpus.last().copied());
    }

    #[test]
    fn postcopy_split_keeps_the_fault_path_off_the_background_cpus() {
        assert_eq!(PostcopyCpus::split(&[]), PostcopyCpus::default());
        assert_eq!(
            PostcopyCpus::split(&[3]),
            PostcopyCpus::default(),
            "one CPU: unpinned"
        );
        let s = PostcopyCpus::split(&[0, 2, 5]);
        assert_eq!((s.fault_path, s.background), (vec![5], vec![0, 2]));
        let here = PostcopyCpus::split_allowed();
        let cpus = allowed_cpus().expect("affinity");
        if cpus.len() >= 2 {
            let mut all = [here.fault_path.clone(), here.background.clone()].concat();
            all.sort_unstable();
            assert_eq!(all, cpus, "every allowed CPU, each once");
            assert_eq!(here.fault_path.len(), 1);
        }
    }

    #[test]
    fn pinning_takes_effect_on_a_thread() {
        let cpus = allowed_cpus().expect("affinity");
        let target = *cpus.last().expect("a cpu");
        let seen = std::thread::spawn(move || {
            pin_current_thread(target).expect("pin");
            allowed_cpus().expect("affinity")
        })
        .join()
        .expect("join");
        assert_eq!(seen, vec![target]);
    }
}

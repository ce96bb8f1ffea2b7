//! Sharing a machine's cores between the ranks on it, and the process's CPU time.

use std::time::Duration;

/// The environment variable that sets the threads of each rank's candle pool.
pub const THREADS_ENV: &str = "MINIBATCH_THREADS_PER_RANK";

/// The threads each of `local_ranks` ranks on this machine should use:
/// [`THREADS_ENV`] when set; else, when the launcher already bound this
/// process to fewer cores than the machine has (`mpirun`'s default
/// `--bind-to core`), those cores; else the machine's cores divided by the
/// ranks on it. At least 1.
pub fn threads_per_rank(local_ranks: usize) -> usize {
    if let Some(n) = std::env::var(THREADS_ENV)
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
    {
        return n;
    }
    let allowed = std::thread::available_parallelism().map_or(1, |n| n.get());
    let online = online_cpus().unwrap_or(allowed);
    if allowed < online {
        return allowed.max(1);
    }
    (online / local_ranks.max(1)).max(1)
}

fn online_cpus() -> Option<usize> {
    // SAFETY: sysconf reads a system value and has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    (n > 0).then_some(n as usize)
}

/// Sizes candle's CPU thread pool for this rank: `threads`, or
/// [`threads_per_rank`]`(local_ranks)` when `None`, by setting
/// `CANDLE_NUM_THREADS` and `RAYON_NUM_THREADS` (unless already set, which
/// wins). Returns the number the pool will have. It must run before the
/// first candle operation (candle builds its pool once, lazily).
pub fn configure_threads(local_ranks: usize, threads: Option<usize>) -> usize {
    if threads.is_none() {
        if let Some(n) = std::env::var("CANDLE_NUM_THREADS")
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .filter(|n| *n > 0)
        {
            return n;
        }
    }
    let n = threads
        .filter(|n| *n > 0)
        .unwrap_or_else(|| threads_per_rank(local_ranks));
    std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    n
}

/// The CPU time this process has used so far (user + system, all threads),
/// to report beside the wall time: spinning pool threads show up here.
pub fn cpu_time() -> Duration {
    // SAFETY: `usage` is a plain C struct that getrusage fills; zeroed is a
    // valid value for it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage struct and RUSAGE_SELF.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, (t.tv_usec as u32) * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

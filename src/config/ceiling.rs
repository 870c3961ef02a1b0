//! How many connections this machine's limits allow one process to hold.

/// Threads each chat connection uses (its reader and its subscriber).
pub const THREADS_PER_CONNECTION: usize = 2;

/// Most connections in their start at once. A starting connection has a
/// third thread (its start thread, until the accept loop has joined it), so
/// the ceiling keeps room for this many; past it, the accept loop waits for
/// a start to finish before it accepts more (the kernel queues the rest).
pub const MAX_STARTING: usize = 1024;
/// Memory maps one thread costs on Linux (its stack, guard page and glibc's
/// bookkeeping); see docs/OPERATIONS.md, "Many clients: the kernel settings".
const MAPS_PER_THREAD: usize = 4;
/// The most connections this process can hold, each holding
/// `fds_per_connection` file descriptors (its socket and, with per-client
/// Redis subscriptions, its subscriber's Redis connection), without hitting:
///
/// * the kernel's memory-map limit, `vm.max_map_count` (past it a Rust
///   process *aborts* when it spawns a thread);
/// * the open-file limit (past it `accept` fails);
/// * the system's thread limits, `kernel.threads-max` and `kernel.pid_max`
///   (past them spawning a thread fails, and the client gets a 503).
pub fn connection_ceiling(fds_per_connection: usize) -> usize {
    let max_maps = read_number("/proc/sys/vm/max_map_count").unwrap_or(65_530);
    let max_files = open_file_limit().unwrap_or(1024);
    let max_threads = read_number("/proc/sys/kernel/threads-max")
        .unwrap_or(usize::MAX)
        .min(read_number("/proc/sys/kernel/pid_max").unwrap_or(32_768));
    // Leave room for the start threads (see `MAX_STARTING`), and for
    // everything else the process (and the machine) maps, opens and runs.
    let by_maps = max_maps.saturating_sub(2_000 + MAX_STARTING * MAPS_PER_THREAD)
        / (THREADS_PER_CONNECTION * MAPS_PER_THREAD);
    let by_files = max_files.saturating_sub(100) / fds_per_connection.max(1);
    let by_threads = max_threads.saturating_sub(2_000 + MAX_STARTING) / THREADS_PER_CONNECTION;
    by_maps.min(by_files).min(by_threads).max(1)
}

fn read_number(path: &str) -> Option<usize> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The soft open-file limit, read from `/proc/self/limits` (no libc needed).
fn open_file_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

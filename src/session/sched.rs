//! Scheduling policy for subscriber threads: woken, they wait their turn.
//!
//! A message to a room of 1,000 wakes 1,000 subscriber threads, one after
//! another, from one thread: the room's dispatcher (shared subscriptions),
//! the sender's reader thread (in-process relay) or Redis itself (per-client
//! subscriptions). Under Linux's default policy each thread woken may
//! *preempt* the waker at once — it has slept, so it is owed CPU time. The
//! waker then spends most of the fan-out waiting for the CPU while the
//! threads it already woke write their frames, and the room's last client
//! gets the message late.
//!
//! `SCHED_BATCH` is the same fair policy minus that preemption: a woken
//! batch thread waits until the running thread blocks or its time slice
//! ends. The waker finishes waking everyone first, the subscribers then run
//! on every core, and there are fewer context switches per delivery (the
//! effect on latency and CPU is in `docs/PERFORMANCE.md`). A batch thread
//! gets the same share of CPU; only the order in which woken threads run
//! changes. Any process may choose it for its own
//! threads; where the kernel refuses (or on other systems) nothing changes.

/// Puts the calling thread under `SCHED_BATCH` (see the module doc). Best
/// effort: a refusal leaves the default policy in place.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
pub(super) fn wait_turn_when_woken() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param that outlives the call; pid 0
    // means the calling thread. The call changes nothing but its policy.
    let refused = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) } != 0;
    if refused {
        log::debug!("SCHED_BATCH refused: {}", std::io::Error::last_os_error());
    }
}

/// Other systems: the default policy.
#[cfg(not(target_os = "linux"))]
pub(super) fn wait_turn_when_woken() {}

//! Surviving a mapped file that shrinks under us.
//!
//! Reading a page of a memory map whose file has been truncated past that page raises SIGBUS,
//! which by default kills the process. rlmask maps every input shard, so a checkpoint being
//! rewritten or truncated by another process while it is compared would end the program with a
//! signal instead of an error. The choice made here: a process-wide SIGBUS handler that knows
//! the address ranges of the maps we registered. When a fault lands in one of them, the handler
//! maps anonymous zero pages over the rest of that map (`mmap(MAP_FIXED | MAP_ANONYMOUS)`),
//! marks the map as faulted and returns; the faulting load is then retried and reads zeros. The
//! reader checks the mark after every chunk it compares ([`Guard::faulted`]) and turns it into
//! an error naming the file, so no figure computed from the zeros is ever reported. A fault
//! outside our maps reinstalls the previous handler and returns, so the fault repeats and is
//! handled as it would have been without rlmask (normally: the process dies).
//!
//! The alternative, reading with `pread` into buffers, would avoid signals altogether but
//! give up the zero-copy views that masks and `rank` hand to numpy and torch; the handler
//! protects those views too.
//!
//! Only Linux gets the handler; elsewhere [`register`] is a no-op and a truncated file still
//! ends the process (the size and modification-time check after each pass remains).

/// A registered map; dropping it unregisters the range.
#[derive(Debug)]
pub struct Guard {
    #[cfg(target_os = "linux")]
    slot: Option<usize>,
}

impl Guard {
    /// True when a read of the registered map faulted (its file shrank under it).
    pub fn faulted(&self) -> bool {
        #[cfg(target_os = "linux")]
        if let Some(i) = self.slot {
            return imp::SLOTS[i]
                .faulted
                .load(std::sync::atomic::Ordering::Acquire);
        }
        false
    }
}

/// Registers the mapped range `[ptr, ptr + len)` with the SIGBUS handler (installed on first
/// use). When every slot is taken the map is left unguarded.
pub fn register(ptr: *const u8, len: usize) -> Guard {
    #[cfg(target_os = "linux")]
    {
        Guard {
            slot: imp::register(ptr as usize, len),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (ptr, len);
        Guard {}
    }
}

#[cfg(target_os = "linux")]
impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            imp::unregister(i);
        }
    }
}

#[cfg(target_os = "linux")]
mod imp {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::OnceLock;

    /// Maps guarded at once: a trajectory of a hundred checkpoints of thirty shards fits.
    const CAPACITY: usize = 1 << 14;

    pub(super) struct Slot {
        start: AtomicUsize,
        len: AtomicUsize,
        pub(super) faulted: AtomicBool,
    }

    pub(super) static SLOTS: [Slot; CAPACITY] = [const {
        Slot {
            start: AtomicUsize::new(0),
            len: AtomicUsize::new(0),
            faulted: AtomicBool::new(false),
        }
    }; CAPACITY];

    /// The handler that was in place before ours (Python's faulthandler, or the default).
    static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();
    static PAGE: AtomicUsize = AtomicUsize::new(4096);

    fn install() {
        PREVIOUS.get_or_init(|| {
            // SAFETY: sysconf has no preconditions.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            if page > 0 {
                PAGE.store(page as usize, Ordering::Relaxed);
            }
            // SAFETY: `action` is fully initialised (zeroed, then the handler, flags and an
            // empty mask set) before it is passed; `previous` is written by the kernel.
            // `on_sigbus` has the three-argument signature that SA_SIGINFO requires.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_sigbus as *const () as usize;
                action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
                libc::sigemptyset(&mut action.sa_mask);
                let mut previous: libc::sigaction = std::mem::zeroed();
                libc::sigaction(libc::SIGBUS, &action, &mut previous);
                previous
            }
        });
    }

    pub(super) fn register(start: usize, len: usize) -> Option<usize> {
        if start == 0 || len == 0 {
            return None;
        }
        install();
        for (i, slot) in SLOTS.iter().enumerate() {
            if slot
                .start
                .compare_exchange(0, start, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                slot.faulted.store(false, Ordering::Release);
                // Published last: until then the handler sees a zero length and no match.
                slot.len.store(len, Ordering::Release);
                return Some(i);
            }
        }
        None
    }

    pub(super) fn unregister(i: usize) {
        SLOTS[i].len.store(0, Ordering::Release);
        SLOTS[i].start.store(0, Ordering::Release);
    }

    /// The SIGBUS handler. It only loads and stores atomics and makes two system calls
    /// (`mmap`, `sigaction`), which are safe to make from a signal handler on Linux (both are
    /// plain system-call wrappers in glibc and musl; `sigaction` is async-signal-safe by
    /// POSIX).
    extern "C" fn on_sigbus(
        _sig: libc::c_int,
        info: *mut libc::siginfo_t,
        _ctx: *mut libc::c_void,
    ) {
        // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
        let addr = unsafe { (*info).si_addr() } as usize;
        let page = PAGE.load(Ordering::Relaxed);
        for slot in SLOTS.iter() {
            let len = slot.len.load(Ordering::Acquire);
            let start = slot.start.load(Ordering::Acquire);
            if len == 0 || start == 0 || addr < start || addr >= start + len {
                continue;
            }
            let from = addr & !(page - 1);
            let to = (start + len).div_ceil(page) * page;
            // SAFETY: [from, to) lies inside a live read-only map of ours (registered ranges
            // are unregistered before they are unmapped, and this fault is a read of it);
            // replacing those pages with private zero pages changes only what later reads of
            // this map see, which the reader learns from `faulted` and reports as an error.
            let mapped = unsafe {
                libc::mmap(
                    from as *mut libc::c_void,
                    to - from,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if mapped != libc::MAP_FAILED {
                slot.faulted.store(true, Ordering::Release);
                return;
            }
            break;
        }
        // Not ours (or the zero pages could not be mapped): restore the previous disposition
        // and return, so the fault repeats and is handled as it would have been without us.
        if let Some(previous) = PREVIOUS.get() {
            // SAFETY: `previous` is the disposition the kernel reported when ours was
            // installed; sigaction is async-signal-safe.
            unsafe { libc::sigaction(libc::SIGBUS, previous, std::ptr::null_mut()) };
        }
    }
}

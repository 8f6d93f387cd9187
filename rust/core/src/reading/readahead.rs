//! A pass over memory-mapped shards in file order, with reading ahead of it.
//!
//! On a cold page cache the comparison is limited by the disk, and the workers' own page
//! faults keep only as many reads in flight as there are workers. Here
//! the work items are taken strictly in order by every worker (so the pass moves through each
//! file front to back instead of from several far-apart places), and one reader thread per
//! side (the two checkpoints of a diff, every checkpoint of a trajectory; past
//! `MAX_READERS` sides, a pool of readers takes the most urgent reads of all) reads the
//! items' stretches of file into the page cache a bounded window ahead of the workers, the
//! sides in step. Behind the workers, each file's pages are unmapped from the process in whole
//! blocks as soon as every item's bytes in a block are done (`Behind`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::error::Result;
use crate::safetensors::Shard;

/// A stretch of one shard's file that an item reads: byte offset and length in the file.
#[derive(Clone, Copy)]
pub struct Stretch<'a> {
    pub shard: &'a Shard,
    pub offset: usize,
    pub len: usize,
}

/// Reads at most this many bytes at once.
const BLOCK: usize = 8 << 20;

/// How far ahead of the workers the readers may be, in bytes of items (all sides): enough
/// to keep the disk busy through a worker's stall, small next to any machine's page cache.
/// Pages behind the workers are left to the kernel (the maps are `MADV_SEQUENTIAL`, so it
/// reclaims them first when memory is short).
const WINDOW: u64 = 256 << 20;

/// At most this many reader threads. Up to this many sides each has a reader of its own (a
/// cold run of 11 checkpoints read at 99% of 11 parallel `cat` that way, and at 90% with a
/// pool of 8); a trajectory of hundreds of cold checkpoints shares a pool of this many
/// instead of starting hundreds of threads.
const MAX_READERS: usize = 16;

/// Pages behind the pass are unmapped in aligned blocks of this many bytes of file, a multiple
/// of the 2 MiB huge page. Unmapping each work item's stretch (a 512 KiB chunk) as it was done
/// split the page cache's huge pages out of the process's page tables and sent the other core
/// a TLB shootdown every time: a warm diff of a 0.46B pair spent a sixth of its time there.
const RELEASE: usize = 8 << 20;

/// What is left to do of each [`RELEASE`] block of each file of a pass: the bytes of the
/// items' stretches in it, counted when the pass is planned and counted down as items are
/// done. The worker that finishes a block's last bytes unmaps the whole block
/// ([`Shard::release`]; the file's pages stay in the page cache), so the pages of a pair
/// larger than memory are not held by this process, and nothing is left to unmap at the end.
#[derive(Default)]
struct Behind<'a> {
    /// By the shard's address: the shard, and the bytes left in each of its blocks.
    files: HashMap<usize, (&'a Shard, Vec<AtomicU32>)>,
}

/// The blocks a stretch touches, with the stretch's bytes in each.
fn blocks(s: &Stretch) -> impl Iterator<Item = (usize, u32)> {
    let (start, end) = (s.offset, s.offset + s.len);
    let first = start / RELEASE;
    let last = if s.len == 0 {
        first
    } else {
        end.div_ceil(RELEASE)
    };
    (first..last).map(move |b| {
        let n = end.min((b + 1) * RELEASE) - start.max(b * RELEASE);
        (b, n as u32) // at most RELEASE bytes
    })
}

impl<'a> Behind<'a> {
    /// Counts a stretch of an item of the pass.
    fn add(&mut self, s: &Stretch<'a>) {
        let (_, left) = self
            .files
            .entry(s.shard as *const Shard as usize)
            .or_insert_with(|| {
                let n = s.shard.file_bytes().len().div_ceil(RELEASE);
                (s.shard, (0..n).map(|_| AtomicU32::new(0)).collect())
            });
        // Saturating, never a panic: past 4 GiB of stretches in one 8 MiB block (hundreds of
        // sides on one file) the count wraps on the way down and the block may be released
        // early, which only costs page faults (a release is a hint; see `Shard::release`).
        for (b, n) in blocks(s) {
            let left = left[b].get_mut();
            *left = left.saturating_add(n);
        }
    }

    /// Counts a stretch of an item as done; calls `release` with each block (its shard, file
    /// offset and length) whose last bytes these were.
    fn done(&self, s: &Stretch<'a>, mut release: impl FnMut(&'a Shard, usize, usize)) {
        let Some((shard, left)) = self.files.get(&(s.shard as *const Shard as usize)) else {
            return;
        };
        for (b, n) in blocks(s) {
            if left[b].fetch_sub(n, Ordering::AcqRel) == n {
                let start = b * RELEASE;
                let len = RELEASE.min(shard.file_bytes().len() - start);
                release(shard, start, len);
            }
        }
    }
}

/// One read of a reader: where, and how many bytes of items (all sides) come before the
/// item that first needs it.
struct Read<'a> {
    shard: &'a Shard,
    offset: usize,
    len: usize,
    needed_at: u64,
}

/// Adds one stretch of a side to its reads, merged into reads of at most [`BLOCK`] bytes in
/// item order. Reads are planned as the items are walked, never from a list of every item's
/// stretches (a trajectory of many checkpoints over a large model has millions of them).
fn plan<'a>(reads: &mut Vec<Read<'a>>, s: Stretch<'a>, needed_at: u64) {
    let mut off = s.offset;
    let end = s.offset + s.len;
    while off < end {
        if let Some(last) = reads.last_mut() {
            if std::ptr::eq(last.shard, s.shard)
                && last.offset + last.len == off
                && last.len < BLOCK
            {
                let n = (BLOCK - last.len).min(end - off);
                last.len += n;
                off += n;
                continue;
            }
        }
        let n = BLOCK.min(end - off);
        reads.push(Read {
            shard: s.shard,
            offset: off,
            len: n,
            needed_at,
        });
        off += n;
    }
}

/// Who reads what: each side's reads by one reader of its own, or, past `max` sides, all
/// sides' reads in one queue in the order the items need them, taken by a pool of `max`
/// readers (so the `max` most urgent reads are in flight, whichever sides they are on).
fn share(mut sides: Vec<Vec<Read<'_>>>, max: usize) -> Vec<(Vec<Read<'_>>, usize)> {
    if sides.len() <= max {
        // A remote side keeps several requests in flight: one at a time leaves a long link
        // idle for a round trip per read.
        let threads = |reads: &Vec<Read>| match reads.first() {
            Some(r) if r.shard.is_remote() => crate::remote::STREAMS,
            _ => 1,
        };
        return sides
            .into_iter()
            .map(|reads| {
                let n = threads(&reads);
                (reads, n)
            })
            .collect();
    }
    let mut all: Vec<Read> = sides.drain(..).flatten().collect();
    all.sort_by_key(|r| r.needed_at); // stable: every side's own reads keep their file order
    vec![(all, max)]
}

/// Plans the reads of items taken in the order given (`stretches`: one per side, the sides in
/// the same order for every item): the readers' reads, at most [`MAX_READERS`] of them, none
/// for a side that is cached already, and every item's bytes (all sides). Counts every
/// stretch in `behind` when one is given.
fn plan_items<'a, I>(
    items: impl IntoIterator<Item = I>,
    stretches: impl Fn(I) -> Vec<Stretch<'a>>,
    mut behind: Option<&mut Behind<'a>>,
) -> (Vec<(Vec<Read<'a>>, usize)>, Vec<u64>) {
    let mut readers: Vec<Vec<Read>> = Vec::new();
    let mut sizes = Vec::new();
    let mut before = 0u64;
    for item in items {
        let st = stretches(item);
        if readers.len() < st.len() {
            readers.resize_with(st.len(), Vec::new);
        }
        let n = st.iter().map(|s| s.len as u64).sum::<u64>();
        if let Some(behind) = behind.as_deref_mut() {
            st.iter().for_each(|s| behind.add(s));
        }
        for (reads, s) in readers.iter_mut().zip(st) {
            plan(reads, s, before);
        }
        sizes.push(n);
        before += n;
    }
    // A side whose file looks cached throughout (the middle page of 64 reads spread over it)
    // gets no reader: on a warm pass the readers would only take time from the workers.
    readers.retain(|reads| {
        let step = reads.len().div_ceil(64).max(1);
        !reads
            .iter()
            .step_by(step)
            .all(|r| r.shard.resident(r.offset + r.len / 2, 1))
    });
    (share(readers, MAX_READERS), sizes)
}

/// How far the pass has come, for its readers: [`Pace::took`] each item as it is taken.
struct Pace<'s> {
    taken: &'s AtomicU64,
    stop: &'s AtomicBool,
    threads: Vec<std::thread::Thread>,
}

impl Pace<'_> {
    /// The pass has taken an item of `bytes` (all sides): the readers may go that much further.
    fn took(&self, bytes: u64) {
        self.taken.fetch_add(bytes, Ordering::Release);
        for t in &self.threads {
            t.unpark();
        }
    }

    /// The pass is over (or failed): the readers stop.
    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in &self.threads {
            t.unpark();
        }
    }
}

/// Runs `pass` while the readers read their reads (in order, each when the pass has taken
/// the bytes of items before it less [`WINDOW`]); they stop when `pass` returns.
/// A remote file's readers also stop on `cancel`, and leave a read to the workers once they
/// have taken the item that needs it first.
fn with_readers<T>(
    readers: &[(Vec<Read<'_>>, usize)],
    cancel: &AtomicBool,
    pass: impl FnOnce(&Pace) -> T,
) -> T {
    let taken = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let next: Vec<AtomicUsize> = readers.iter().map(|_| AtomicUsize::new(0)).collect();
    std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for ((reads, threads), next) in readers.iter().zip(&next) {
            for _ in 0..*threads {
                let (taken, stop) = (&taken, &stop);
                let halt = move || stop.load(Ordering::Relaxed) || cancel.load(Ordering::Relaxed);
                handles.push(scope.spawn(move || {
                    while let Some(r) = reads.get(next.fetch_add(1, Ordering::Relaxed)) {
                        // Cached already (a warm file): nothing to read, nothing to wait for.
                        if r.shard.resident(r.offset, r.len) {
                            continue;
                        }
                        while r.needed_at > taken.load(Ordering::Acquire) + WINDOW {
                            if stop.load(Ordering::Relaxed) {
                                return;
                            }
                            std::thread::park();
                        }
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        // A remote read whose first item a worker has taken is the worker's
                        // to fetch (read here too, its bytes could arrive after the pass
                        // released them, and stay held to the end).
                        let wanted = || r.needed_at >= taken.load(Ordering::Acquire);
                        r.shard.read_ahead(r.offset, r.len, &halt, &wanted);
                    }
                }));
            }
        }
        let pace = Pace {
            taken: &taken,
            stop: &stop,
            threads: handles.iter().map(|h| h.thread().clone()).collect(),
        };
        let out = pass(&pace);
        pace.stop();
        out
    })
}

/// Runs `pass` with readers ahead of it over `items` (each item's stretches, one per side),
/// for a pass that goes through the items in this order itself and calls the function it is
/// given with each item's index as it starts that item. For passes that must keep their own
/// order (a patch is written in order); [`in_order`] runs the items on every worker.
pub fn ahead<'a, T>(
    items: impl IntoIterator<Item = Vec<Stretch<'a>>>,
    pass: impl FnOnce(&dyn Fn(usize)) -> T,
) -> T {
    let (readers, sizes) = plan_items(items, |st| st, None);
    let never = AtomicBool::new(false);
    with_readers(&readers, &never, |pace| pass(&|i| pace.took(sizes[i])))
}

/// Runs `work` on every item, the items taken in the order given by all of rayon's workers,
/// while readers keep each item's stretches (`stretches`: one per side, the sides in the same
/// order for every item) in the page cache up to a window ahead, and the pages behind the
/// workers are unmapped from the process block by block (`Behind`). Results come back in no
/// particular order; the first error stops the pass. The stretches of a remote shard are
/// fetched before the item's `work` ([`Shard::ensure`]); `cancel` stops the workers waiting
/// for them and the readers fetching them.
pub fn in_order<'a, I, R, S>(
    items: Vec<I>,
    cancel: &AtomicBool,
    stretches: impl Fn(&I) -> Vec<Stretch<'a>> + Sync,
    init: impl Fn() -> S + Sync,
    work: impl Fn(&mut S, I) -> Result<R> + Sync,
) -> Result<Vec<R>>
where
    I: Send,
    R: Send,
{
    let mut behind = Behind::default();
    let (readers, sizes) = plan_items(&items, &stretches, Some(&mut behind));
    let stop = AtomicBool::new(false);
    let queue = Mutex::new(items.into_iter().zip(sizes));
    let results: Mutex<Vec<R>> = Mutex::new(Vec::new());
    let first_error: Mutex<Option<crate::error::Error>> = Mutex::new(None);

    let halt = || stop.load(Ordering::Relaxed) || cancel.load(Ordering::Relaxed);
    with_readers(&readers, cancel, |pace| {
        rayon::broadcast(|_| {
            let mut state = init();
            let mut mine = Vec::new();
            loop {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let next = queue.lock().unwrap_or_else(|e| e.into_inner()).next();
                let Some((item, size)) = next else {
                    break;
                };
                pace.took(size);
                let spans = stretches(&item);
                let fetched = spans
                    .iter()
                    .try_for_each(|s| s.shard.ensure(s.offset, s.len, &halt));
                match fetched.and_then(|()| work(&mut state, item)) {
                    Ok(r) => {
                        mine.push(r);
                        for s in &spans {
                            behind.done(s, |shard, offset, len| shard.release(offset, len));
                        }
                    }
                    Err(e) => {
                        stop.store(true, Ordering::Relaxed);
                        first_error
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get_or_insert(e);
                        break;
                    }
                }
            }
            results
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .append(&mut mine);
        });
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    Ok(results.into_inner().unwrap_or_else(|e| e.into_inner()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use std::io::Write;
    use std::sync::atomic::AtomicUsize;

    /// A safetensors file holding one U8 tensor of `len` bytes.
    fn shard(dir: &std::path::Path, name: &str, len: usize) -> Shard {
        let header =
            format!(r#"{{"x":{{"dtype":"U8","shape":[{len}],"data_offsets":[0,{len}]}}}}"#);
        let path = dir.join(name);
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
        f.write_all(header.as_bytes()).unwrap();
        f.write_all(&vec![1u8; len]).unwrap();
        drop(f);
        Shard::open(&path).unwrap()
    }

    fn stretch(shard: &Shard, offset: usize, len: usize) -> Stretch<'_> {
        Stretch { shard, offset, len }
    }

    #[test]
    fn reads_merge_contiguous_stretches_up_to_a_block() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (shard(dir.path(), "a", 64), shard(dir.path(), "b", 64));
        let half = BLOCK / 2;
        let mut reads = Vec::new();
        for (s, at) in [
            (stretch(&a, 0, half), 0),
            (stretch(&a, half, half + 10), 5), // fills the first block, 10 bytes over
            (stretch(&a, BLOCK + 10, 20), 9),  // contiguous: joins the second read
            (stretch(&a, BLOCK + 100, 20), 11), // a gap: a new read
            (stretch(&b, BLOCK + 120, 20), 12), // another file: a new read
        ] {
            plan(&mut reads, s, at);
        }
        let got: Vec<_> = reads
            .iter()
            .map(|r| (std::ptr::eq(r.shard, &a), r.offset, r.len, r.needed_at))
            .collect();
        assert_eq!(
            got,
            [
                (true, 0, BLOCK, 0),
                (true, BLOCK, 30, 5),
                (true, BLOCK + 100, 20, 11),
                (false, BLOCK + 120, 20, 12),
            ]
        );
    }

    #[test]
    fn every_item_is_worked_once() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (
            shard(dir.path(), "a", 1 << 20),
            shard(dir.path(), "b", 1 << 20),
        );
        let n = 5000;
        let got = in_order(
            (0..n).collect(),
            &AtomicBool::new(false),
            |&i| {
                let off = (i * 200) % (1 << 20);
                vec![stretch(&a, off, 200), stretch(&b, off, 100)]
            },
            || (),
            |_, i| Ok(i),
        )
        .unwrap();
        let mut got = got;
        got.sort_unstable();
        assert_eq!(got, (0..n).collect::<Vec<_>>());
    }

    /// Drops a file's pages from the page cache.
    #[cfg(target_os = "linux")]
    fn evict(shard: &Shard) {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(&shard.path).unwrap();
        f.sync_all().unwrap();
        // SAFETY: a plain advisory call on an open descriptor.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn reading_ahead_puts_evicted_pages_back_in_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let a = shard(dir.path(), "a", 4 << 20);
        evict(&a);
        let len = a.file_bytes().len();
        a.read_ahead(0, len, &|| false, &|| true);
        assert!(a.resident(0, len));
    }

    #[test]
    fn sides_past_the_cap_share_a_pool_of_readers_in_the_order_items_need_them() {
        let dir = tempfile::tempdir().unwrap();
        let files: Vec<Shard> = (0..5)
            .map(|i| shard(dir.path(), &i.to_string(), 64))
            .collect();
        // Side i reads 3 stretches of its file, needed from item bytes 10 * k + i on.
        let sides = || -> Vec<Vec<Read>> {
            files
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    let mut reads = Vec::new();
                    for k in 0..3 {
                        plan(&mut reads, stretch(f, 20 * k, 10), 10 * k as u64 + i as u64);
                    }
                    reads
                })
                .collect()
        };
        let key = |r: &Read| (r.shard.path.clone(), r.offset, r.needed_at);
        // Up to the cap: a reader per side, its own reads.
        let own = share(sides(), 5);
        assert!(own.iter().all(|(reads, n)| *n == 1 && reads.len() == 3));
        // Past it: one queue of every read, most urgent first, for a pool of 2.
        let pooled = share(sides(), 2);
        assert_eq!(pooled.len(), 1);
        let (queue, threads) = &pooled[0];
        assert_eq!(*threads, 2);
        let at: Vec<u64> = queue.iter().map(|r| r.needed_at).collect();
        assert_eq!(
            at,
            (0..3)
                .flat_map(|k| (0..5).map(move |i| 10 * k + i))
                .collect::<Vec<u64>>()
        );
        let mut want: Vec<_> = sides().iter().flatten().map(key).collect();
        let mut got: Vec<_> = queue.iter().map(key).collect();
        want.sort();
        got.sort();
        assert_eq!(got, want);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_readers_bring_every_evicted_side_in_ahead_of_the_workers() {
        // More sides than readers, as a long trajectory has: readers serve several.
        let dir = tempfile::tempdir().unwrap();
        let files: Vec<Shard> = (0..MAX_READERS + 3)
            .map(|i| shard(dir.path(), &i.to_string(), 6 << 20))
            .collect();
        files.iter().for_each(evict);
        // The workers never touch the files: only the readers can bring them in. The first
        // item waits for that (the files are smaller than the window, so the readers read
        // them whole at once).
        let got = in_order(
            (0..12).collect(),
            &AtomicBool::new(false),
            |&i: &usize| files.iter().map(|f| stretch(f, i << 19, 1 << 19)).collect(),
            || (),
            |_, i| {
                if i > 0 {
                    return Ok(true);
                }
                let t = std::time::Instant::now();
                while t.elapsed().as_secs() < 20 {
                    if files.iter().all(|f| f.resident(0, 6 << 20)) {
                        return Ok(true);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Ok(false)
            },
        )
        .unwrap();
        assert_eq!(got.len(), 12);
        assert!(got.iter().all(|&ok| ok));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_pass_in_its_own_order_gets_readers_too() {
        let dir = tempfile::tempdir().unwrap();
        let files: Vec<Shard> = (0..3)
            .map(|i| shard(dir.path(), &i.to_string(), 4 << 20))
            .collect();
        files.iter().for_each(evict);
        let items = (0..8).map(|i| files.iter().map(|f| stretch(f, i << 19, 1 << 19)).collect());
        let all_in = ahead(items, |took| {
            took(0);
            let t = std::time::Instant::now();
            while t.elapsed().as_secs() < 20 {
                if files.iter().all(|f| f.resident(0, 4 << 20)) {
                    return true;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            false
        });
        assert!(all_in);
    }

    #[test]
    fn released_pages_read_back_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let a = shard(dir.path(), "a", 3 << 20);
        let sum = |s: &Shard| s.file_bytes().iter().map(|&b| b as u64).sum::<u64>();
        let before = sum(&a);
        // Unaligned ends: only the whole pages inside are released.
        a.release(100, (2 << 20) + 5);
        a.release(0, a.file_bytes().len());
        assert_eq!(sum(&a), before);
        // The data bytes are all 1 (see `shard`); the header's bytes come first.
        let header: u64 = a.file_bytes()[..a.tensors[0].offset]
            .iter()
            .map(|&b| b as u64)
            .sum();
        assert_eq!(before, header + (3 << 20));
    }

    #[test]
    fn each_block_is_released_once_when_its_last_bytes_are_done() {
        let dir = tempfile::tempdir().unwrap();
        let a = shard(dir.path(), "a", (20 << 20) + 100);
        let b = shard(dir.path(), "b", 5 << 20);
        // Stretches of unaligned lengths from each tensor's start, as a pass's chunks are.
        let mut all = Vec::new();
        for (f, step) in [(&a, 700_000), (&b, 300_000)] {
            let (start, end) = (f.tensors[0].offset, f.file_bytes().len());
            all.extend(
                (start..end)
                    .step_by(step)
                    .map(|o| stretch(f, o, step.min(end - o))),
            );
        }
        let mut behind = Behind::default();
        all.iter().for_each(|s| behind.add(s));
        // Done in a scrambled order, as workers finish them.
        let mut order: Vec<usize> = (0..all.len()).collect();
        let mut x = 12345u64;
        for i in (1..order.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            order.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let mut done = vec![false; all.len()];
        let mut released = Vec::new();
        for &i in &order {
            done[i] = true;
            behind.done(&all[i], |f, start, len| {
                let end = f.file_bytes().len();
                assert_eq!(start % RELEASE, 0);
                assert!(len == RELEASE || start + len == end);
                // Every stretch in the block is done by now.
                for (j, s) in all.iter().enumerate() {
                    let inside = std::ptr::eq(s.shard, f)
                        && s.offset < start + len
                        && start < s.offset + s.len;
                    assert!(!inside || done[j]);
                }
                released.push((f.path.clone(), start));
            });
        }
        // Every block the stretches touch, once.
        let mut want: Vec<_> = all
            .iter()
            .flat_map(|s| blocks(s).map(|(blk, _)| (s.shard.path.clone(), blk * RELEASE)))
            .collect();
        want.sort();
        want.dedup();
        released.sort();
        assert_eq!(released, want);
        assert_eq!(want.len(), 3 + 1);
    }

    /// Resident bytes of this process's mapping that starts at `at` (`/proc/self/smaps`).
    #[cfg(target_os = "linux")]
    fn mapped_bytes(at: *const u8) -> usize {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{:x}-", at as usize);
        let entry = smaps
            .split('\n')
            .skip_while(|l| !l.starts_with(&start))
            .find(|l| l.starts_with("Rss:"))
            .unwrap()
            .to_string();
        let kb: usize = entry.split_whitespace().nth(1).unwrap().parse().unwrap();
        kb * 1024
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_pass_leaves_none_of_its_pages_mapped() {
        let dir = tempfile::tempdir().unwrap();
        let files = [
            shard(dir.path(), "a", (20 << 20) + 100),
            shard(dir.path(), "b", (20 << 20) + 100),
        ];
        let n = files[0].file_bytes().len();
        let start = files[0].tensors[0].offset;
        let sums = in_order(
            (start..n).step_by(1 << 19).collect(),
            &AtomicBool::new(false),
            |&o: &usize| {
                files
                    .iter()
                    .map(|f| stretch(f, o, (1 << 19).min(n - o)))
                    .collect()
            },
            || (),
            |_, o| {
                let end = (o + (1 << 19)).min(n);
                Ok(files
                    .iter()
                    .map(|f| {
                        f.file_bytes()[o..end]
                            .iter()
                            .map(|&b| b as u64)
                            .sum::<u64>()
                    })
                    .sum::<u64>())
            },
        )
        .unwrap();
        assert_eq!(sums.iter().sum::<u64>(), 2 * (20 << 20) + 200);
        // All of both files was read through the maps; at most the last page of each (the
        // file's partial page, which release leaves) is still mapped.
        for f in &files {
            assert!(mapped_bytes(f.file_bytes().as_ptr()) <= 4096);
        }
    }

    #[test]
    fn the_first_error_stops_the_pass() {
        let dir = tempfile::tempdir().unwrap();
        let a = shard(dir.path(), "a", 1 << 16);
        let worked = AtomicUsize::new(0);
        let n = 100_000;
        let got = in_order(
            (0..n).collect(),
            &AtomicBool::new(false),
            |_| vec![stretch(&a, 0, 64), stretch(&a, 64, 64)],
            || (),
            |_, i: usize| {
                worked.fetch_add(1, Ordering::Relaxed);
                if i == 10 {
                    Err(Error::Cancelled)
                } else {
                    Ok(i)
                }
            },
        );
        assert!(matches!(got, Err(Error::Cancelled)));
        // Items are taken in order and every worker stops at its next item: far fewer than n.
        assert!(worked.load(Ordering::Relaxed) < 1000);
    }
}

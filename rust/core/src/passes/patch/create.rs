//! Creating a patch: one streaming pass over both checkpoints, changed positions held in
//! order (in memory, spilled to scratch files past a bound), then the patch file assembled.

use super::apply::AtomicFile;
use super::fingerprint::{leaf, root, Leaf};
use super::*;
use crate::plan::{plan, PlanOptions};

/// Calls `$f::<S>($args)` with the element size `$size` (1, 2, 4 or 8) as `S`.
macro_rules! by_size {
    ($size:expr, $f:ident($($args:expr),*)) => {
        match $size {
            1 => $f::<1>($($args),*),
            2 => $f::<2>($($args),*),
            4 => $f::<4>($($args),*),
            _ => $f::<8>($($args),*),
        }
    };
}

/// Appends the flat indices (`wide`: i64, else i32, little-endian) and `b`'s values of the
/// elements of `size` bytes (1, 2, 4 or 8) whose bits differ between `a` and `b`, the first at
/// index `first`.
fn changed_into(
    a: &[u8],
    b: &[u8],
    size: usize,
    first: u64,
    wide: bool,
    idx: &mut Vec<u8>,
    vals: &mut Vec<u8>,
) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: `changed_into_avx2` requires only the AVX2 extension, and the CPU has just
        // reported that it supports AVX2.
        return unsafe { changed_into_avx2(a, b, size, first, wide, idx, vals) };
    }
    by_size!(
        size,
        changed_into_impl(a, b, Sink::new(first, wide, idx, vals), differing_bytes)
    )
}

/// [`changed_into`] for one leaf of each side, and the leaves' digests ([`leaf`]). With AVX2,
/// a whole leaf is compared and hashed in one loop, each 64-byte block loaded once.
fn compare_leaf(
    a: &[u8],
    b: &[u8],
    size: usize,
    first: u64,
    wide: bool,
    idx: &mut Vec<u8>,
    vals: &mut Vec<u8>,
) -> (Leaf, Leaf) {
    #[cfg(target_arch = "x86_64")]
    if a.len() == LEAF && std::is_x86_feature_detected!("avx2") {
        // SAFETY: `compare_leaf_avx2` requires only the AVX2 extension, and the CPU has just
        // reported that it supports AVX2.
        return unsafe {
            by_size!(
                size,
                compare_leaf_avx2(a, b, Sink::new(first, wide, idx, vals))
            )
        };
    }
    changed_into(a, b, size, first, wide, idx, vals);
    (leaf(a), leaf(b))
}

/// [`changed_into`] compiled for AVX2, its byte masks made by `vpcmpeqb`/`vpmovmskb`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn changed_into_avx2(
    a: &[u8],
    b: &[u8],
    size: usize,
    first: u64,
    wide: bool,
    idx: &mut Vec<u8>,
    vals: &mut Vec<u8>,
) {
    let differing = |x: &[u8; 64], y: &[u8; 64]| differing_avx2(load_avx2(x), load_avx2(y));
    by_size!(
        size,
        changed_into_impl(a, b, Sink::new(first, wide, idx, vals), differing)
    )
}

/// [`compare_leaf`] of a whole leaf with AVX2: each block's two halves loaded once, for the
/// compare's mask and for both sides' XXH3 stripes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn compare_leaf_avx2<const S: usize>(a: &[u8], b: &[u8], mut sink: Sink<S>) -> (Leaf, Leaf) {
    use super::fingerprint::avx2::{Acc, ROUND, ROUNDS};
    let (a, b): (&[u8; LEAF], &[u8; LEAF]) = (
        a.try_into().expect("a whole leaf"),
        b.try_into().expect("a whole leaf"),
    );
    // First the whole leaf without a branch (a branch on whether a block changed is taken
    // about one block in four at RL's densities, and each misprediction throws away the loads
    // in flight): each block's mask kept, and a bit per block that has changes.
    const BLOCKS: usize = LEAF / 64;
    let mut masks = [0u64; BLOCKS];
    let mut changed = [0u64; BLOCKS / 64];
    let (mut ha, mut hb) = (Acc::new(), Acc::new());
    for r in 0..ROUNDS {
        for s in 0..ROUND {
            let k = ROUND * r + s;
            let (x, y): (&[u8; 64], &[u8; 64]) = (
                a[64 * k..64 * k + 64].try_into().expect("64 bytes"),
                b[64 * k..64 * k + 64].try_into().expect("64 bytes"),
            );
            let (p, q) = (load_avx2(x), load_avx2(y));
            ha.stripe(r, s, p);
            hb.stripe(r, s, q);
            let m = differing_avx2(p, q);
            masks[k] = m;
            changed[k / 64] |= u64::from(m != 0) << (k % 64);
        }
        ha.end_round(r);
        hb.end_round(r);
    }
    // Then the changed blocks only, the leaf still in the cache.
    for (w, &word) in changed.iter().enumerate() {
        sink.grow(64 * 64 / S);
        let mut word = word;
        while word != 0 {
            let k = 64 * w + word.trailing_zeros() as usize;
            let y: &[u8; 64] = b[64 * k..64 * k + 64].try_into().expect("64 bytes");
            sink.block(masks[k], y, 64 * k);
            word &= word - 1;
        }
    }
    sink.finish();
    (ha.finish(), hb.finish())
}

/// Bit `i` set where byte `i` of `x` and `y` differ.
#[inline(always)]
fn differing_bytes(x: &[u8; 64], y: &[u8; 64]) -> u64 {
    let mut m = 0u64;
    for (k, (x, y)) in x.chunks_exact(8).zip(y.chunks_exact(8)).enumerate() {
        let d = u64::from_le_bytes(x.try_into().expect("8 bytes"))
            ^ u64::from_le_bytes(y.try_into().expect("8 bytes"));
        // The top bit of each byte set where the byte is not zero, then those eight bits
        // gathered into one byte (bit j for byte j) by a multiplication.
        const LOW: u64 = 0x7F7F_7F7F_7F7F_7F7F;
        let top = (((d & LOW) + LOW) | d) & !LOW;
        m |= (((top >> 7).wrapping_mul(0x0102_0408_1020_4080)) >> 56) << (8 * k);
    }
    m
}

/// A 64-byte block in two AVX2 registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn load_avx2(x: &[u8; 64]) -> [std::arch::x86_64::__m256i; 2] {
    use std::arch::x86_64::_mm256_loadu_si256;
    // SAFETY: each load reads 32 bytes at offset 0 or 32 of a 64-byte array; unaligned loads.
    unsafe { [0, 32].map(|o| _mm256_loadu_si256(x.as_ptr().add(o).cast())) }
}

/// [`differing_bytes`] of two blocks in AVX2 registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn differing_avx2(p: [std::arch::x86_64::__m256i; 2], q: [std::arch::x86_64::__m256i; 2]) -> u64 {
    use std::arch::x86_64::*;
    let half = |h: usize| !(_mm256_movemask_epi8(_mm256_cmpeq_epi8(p[h], q[h])) as u32) as u64;
    half(0) | (half(1) << 32)
}

/// [`changed_into`] with elements of `S` bytes, each 64-byte block's differing bytes found by
/// `differing`.
#[inline(always)]
fn changed_into_impl<const S: usize>(
    a: &[u8],
    b: &[u8],
    mut sink: Sink<S>,
    differing: impl Fn(&[u8; 64], &[u8; 64]) -> u64,
) {
    // The buffers grow a span of blocks at a time (see [`Sink::grow`]).
    const SPAN: usize = 8 << 10;
    let whole = a.len() / 64 * 64;
    for (s, (xa, yb)) in a[..whole]
        .chunks(SPAN)
        .zip(b[..whole].chunks(SPAN))
        .enumerate()
    {
        sink.grow(xa.len() / S);
        // A block of 64 bytes at a time: which bytes differ, as a mask (a few vector
        // instructions; at 1% changed three blocks in four of BF16 have none), then one step
        // per changed element.
        for (k, (x, y)) in xa.chunks_exact(64).zip(yb.chunks_exact(64)).enumerate() {
            let (x, y): (&[u8; 64], &[u8; 64]) = (
                x.try_into().expect("64 bytes"),
                y.try_into().expect("64 bytes"),
            );
            let m = differing(x, y);
            if m != 0 {
                sink.block(m, y, s * SPAN + 64 * k);
            }
        }
    }
    // The last bytes short of a block (a tensor's end), element by element.
    sink.grow((a.len() - whole) / S);
    for e in whole / S..a.len() / S {
        let y = &b[e * S..(e + 1) * S];
        if a[e * S..(e + 1) * S] != *y {
            sink.push(e, y.try_into().expect("S bytes"));
        }
    }
    sink.finish();
}

/// Where a compare appends the changed elements (of `S` bytes) it finds: their indices and
/// values, each buffer grown (zeroed) a stretch of elements ahead of what it holds, so the
/// compare writes each change at its place without growing per element, and only as much is
/// zeroed as a stretch may use (zeroing room for every element of a chunk up front was a tenth
/// of a patch's time).
struct Sink<'v, const S: usize> {
    idx: &'v mut Vec<u8>,
    vals: &'v mut Vec<u8>,
    /// i64 indices, else i32.
    wide: bool,
    /// The index of the compared bytes' first element.
    first: u64,
    /// What the buffers held before, and the changes found since.
    i0: usize,
    v0: usize,
    count: usize,
}

impl<'v, const S: usize> Sink<'v, S> {
    /// The bit of each element's first byte in a block's byte mask.
    const FIRSTS: u64 = match S {
        1 => u64::MAX,
        2 => 0x5555_5555_5555_5555,
        4 => 0x1111_1111_1111_1111,
        _ => 0x0101_0101_0101_0101,
    };

    #[inline(always)]
    fn new(first: u64, wide: bool, idx: &'v mut Vec<u8>, vals: &'v mut Vec<u8>) -> Sink<'v, S> {
        let (i0, v0) = (idx.len(), vals.len());
        Sink {
            idx,
            vals,
            wide,
            first,
            i0,
            v0,
            count: 0,
        }
    }

    /// Index width in bytes.
    #[inline(always)]
    fn iw(&self) -> usize {
        if self.wide {
            8
        } else {
            4
        }
    }

    /// Room for `elements` more changes than found so far.
    #[inline(always)]
    fn grow(&mut self, elements: usize) {
        let n = self.count + elements;
        let (ni, nv) = (self.i0 + n * self.iw(), self.v0 + n * S);
        if self.idx.len() < ni {
            self.idx.resize(ni, 0);
        }
        if self.vals.len() < nv {
            self.vals.resize(nv, 0);
        }
    }

    /// Element `e` (from the first) changed to `y`.
    #[inline(always)]
    fn push(&mut self, e: usize, y: &[u8; S]) {
        let (c, i) = (self.count, self.first + e as u64);
        if self.wide {
            self.idx[self.i0 + c * 8..][..8].copy_from_slice(&i.to_le_bytes());
        } else {
            self.idx[self.i0 + c * 4..][..4].copy_from_slice(&(i as u32).to_le_bytes());
        }
        self.vals[self.v0 + c * S..][..S].copy_from_slice(y);
        self.count += 1;
    }

    /// The changes of the block of `y` at byte `at`, whose differing bytes are `m`'s bits.
    #[inline(always)]
    fn block(&mut self, m: u64, y: &[u8; 64], at: usize) {
        // Any byte of an element differing marks its first byte.
        let mut e = m;
        let mut k = 1;
        while k < S {
            e |= e >> k;
            k *= 2;
        }
        e &= Self::FIRSTS;
        while e != 0 {
            let p = e.trailing_zeros() as usize;
            // An element never straddles blocks: blocks start at multiples of 64 bytes.
            self.push((at + p) / S, y[p..p + S].try_into().expect("S bytes"));
            e &= e - 1;
        }
    }

    /// Cuts the buffers to the changes found.
    #[inline(always)]
    fn finish(self) {
        let iw = self.iw();
        self.idx.truncate(self.i0 + self.count * iw);
        self.vals.truncate(self.v0 + self.count * S);
    }
}

/// Bytes of changes each [`Scratch`] holds in memory before it spills to a file: two of them
/// hold at most as much as the read-ahead window.
const HELD: usize = 128 << 20;

/// Where the pass's changes wait for the patch file to be assembled: in memory up to
/// [`HELD`] bytes (reserved, not touched, until used), then in a temporary file beside the
/// output, removed when dropped. A patch whose changes fit is so written once, into the patch;
/// memory stays bounded whatever the patch's size.
struct Scratch {
    tag: &'static str,
    /// [`HELD`] (less in tests).
    limit: usize,
    held: Vec<u8>,
    spill: Option<(PathBuf, BufWriter<File>)>,
    len: u64,
}

impl Scratch {
    fn new(tag: &'static str, limit: usize) -> Scratch {
        Scratch {
            tag,
            limit,
            held: Vec::with_capacity(limit),
            spill: None,
            len: 0,
        }
    }

    fn write(&mut self, out: &Path, bytes: &[u8]) -> Result<()> {
        let io = |e| Error::output(out, e);
        if self.spill.is_none() && self.held.len() + bytes.len() > self.limit {
            let path = crate::atomic::temporary_name(out, self.tag);
            let file = crate::atomic::create_new(&path).map_err(io)?;
            // Removed on drop from here on, whatever fails next.
            let (_, w) = self
                .spill
                .insert((path, BufWriter::with_capacity(1 << 20, file)));
            w.write_all(&std::mem::take(&mut self.held)).map_err(io)?;
        }
        match &mut self.spill {
            Some((_, w)) => w.write_all(bytes).map_err(io)?,
            None => self.held.extend_from_slice(bytes),
        }
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Flushes what was spilled.
    fn flush(&mut self, out: &Path) -> Result<()> {
        match &mut self.spill {
            Some((_, w)) => w.flush().map_err(|e| Error::output(out, e)),
            None => Ok(()),
        }
    }

    /// `len` bytes from `at`.
    fn read(&self, out: &Path, at: u64, len: u64) -> Result<std::borrow::Cow<'_, [u8]>> {
        use std::os::unix::fs::FileExt;
        match &self.spill {
            None => Ok(self.held[at as usize..(at + len) as usize].into()),
            Some((_, w)) => {
                let mut buf = vec![0u8; len as usize];
                w.get_ref()
                    .read_exact_at(&mut buf, at)
                    .map_err(|e| Error::output(out, e))?;
                Ok(buf.into())
            }
        }
    }

    /// Appends `len` bytes from `at` to `file` (file to file by the kernel when spilled).
    fn copy_into(&self, file: &mut AtomicFile, at: u64, len: u64) -> Result<()> {
        match &self.spill {
            None => file.write(&self.held[at as usize..(at + len) as usize]),
            Some((_, w)) => file.copy_from(w.get_ref(), at, len),
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some((path, _)) = &self.spill {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// What [`create`] did, per tensor of B (name as stored in B).
pub struct Created {
    pub entries: BTreeMap<String, Entry>,
    /// Size of the patch file.
    pub bytes: u64,
}

/// Where one tensor's changes went in the scratch files.
struct Span {
    changed: u64,
    /// int64 indices (plain).
    wide: bool,
    /// Offsets of its indices and values (plain) or frames (compact) in the scratch files.
    idx_at: u64,
    val_at: u64,
    /// Bytes spilled for it in both.
    stored: u64,
    /// Its frames (compact).
    frames: Vec<Frame>,
    /// The digests of its leaves in base and in tuned, in order (see [`root`]).
    prints: (Vec<Leaf>, Vec<Leaf>),
}

impl Span {
    /// Decodes this tensor's compact frames back from `scratch`.
    fn decode(
        &self,
        scratch: &Scratch,
        out: &Path,
        size: usize,
        numel: u64,
    ) -> Result<(Vec<u64>, Vec<u8>)> {
        let blob = scratch.read(out, self.val_at, self.stored)?;
        let (mut idx, mut vals) = (Vec::new(), Vec::new());
        let mut at = 0usize;
        for (k, f) in self.frames.iter().enumerate() {
            let frame = &blob[at..at + f.bytes as usize];
            crate::codec::decode_nth(&self.frames, k, frame, size, numel, &mut idx, &mut vals)
                .map_err(|why| Error::output(out, std::io::Error::other(why)))?;
            at += f.bytes as usize;
        }
        Ok((idx, vals))
    }
}

/// One compared chunk of a tensor (of job `job`): its changes, as [`Span`] gathers them.
struct Part {
    job: usize,
    start: u64,
    count: u64,
    idx: Vec<u8>,
    vals: Vec<u8>,
    prints: (Vec<Leaf>, Vec<Leaf>),
}

/// One tensor to patch: its name in B and both sides.
struct Job<'a> {
    name: &'a str,
    a: (&'a Shard, &'a TensorInfo),
    b: (&'a Shard, &'a TensorInfo),
}

/// The plan of a patch: the shared [`plan`] of two sides read as stored (bytes, not values),
/// with a patch's stricter demands: both sides hold the same tensors with the same shapes and
/// dtypes (a patch keeps them all). One job per tensor.
fn plan_patch<'s>(
    base: &Checkpoint,
    tuned: &Checkpoint,
    sa: &'s Side<'s>,
    sb: &'s Side<'s>,
) -> Result<Vec<Job<'s>>> {
    let p = plan(sa, sb, &PlanOptions::default())?;
    if !p.only_in_base.is_empty() || !p.only_in_tuned.is_empty() {
        let few = |v: &[String]| v.iter().take(3).cloned().collect::<Vec<_>>().join("', '");
        return Err(Error::Pairing {
            reason: format!(
                "a patch needs the same tensors on both sides: {} only in base ({}, e.g. '{}'), \
                 {} only in tuned ({}, e.g. '{}')",
                p.only_in_base.len(),
                base.path.display(),
                few(&p.only_in_base),
                p.only_in_tuned.len(),
                tuned.path.display(),
                few(&p.only_in_tuned)
            ),
        });
    }
    let mut jobs = Vec::new();
    for pair in p.pairs {
        let (a, b) = (pair.a, pair.b);
        let stored = sa.names[pair.name];
        if a.1.dtype != b.1.dtype {
            return Err(Error::Mismatch {
                tensor: stored.to_string(),
                detail: format!(
                    "{} in base ({}) but {} in tuned ({}): a patch keeps every tensor's dtype",
                    a.1.dtype,
                    a.0.path.display(),
                    b.1.dtype,
                    b.0.path.display()
                ),
            });
        }
        if a.1.dtype == Dtype::F4 {
            return Err(Error::Tensor {
                path: a.0.path.clone(),
                tensor: stored.to_string(),
                reason: "F4 (two codes per byte) is not patched yet; MXFP4 weights stored as \
                         bytes (gpt-oss's U8 _blocks) are"
                    .into(),
            });
        }
        jobs.push(Job { name: stored, a, b });
    }
    Ok(jobs)
}

/// Writes the patch that turns `base` into `tuned` to `out`, atomically. Names pair as in
/// [`crate::diff()`] (wrappers removed, `name_map` applied); both checkpoints must hold the same
/// tensors with the same shapes and dtypes. `provenance` joins the file's metadata.
pub fn create(
    base: &Checkpoint,
    tuned: &Checkpoint,
    out: &Path,
    name_map: &[(String, String)],
    codec: Codec,
    provenance: &BTreeMap<String, String>,
    progress: &Progress,
) -> Result<Created> {
    let sa = Side::stored(base, "base", name_map)?;
    let sb = Side::stored(tuned, "tuned", name_map)?;
    let jobs = plan_patch(base, tuned, &sa, &sb)?;
    // Before the pass: every tensor's description in the metadata (its name, two 32-hex
    // fingerprints, shape, dtype, count, form) is at least this long, so a header past the
    // readers' limit is known now, not after minutes of reading; the exact check follows the
    // pass.
    let least: u64 = jobs.iter().map(|j| j.name.len() as u64 + 2 * 32 + 60).sum();
    check_header_len(out, least, jobs.len())?;
    if jobs.is_empty() {
        return Err(Error::Pairing {
            reason: format!(
                "nothing to patch: {} and {} hold no tensors",
                base.path.display(),
                tuned.path.display()
            ),
        });
    }
    let total: u64 = jobs.iter().map(|j| 2 * j.a.1.len as u64).sum();
    progress.total.store(total, Ordering::Relaxed);

    let mut idx_file = Scratch::new("indices", HELD);
    let mut val_file = Scratch::new("values", HELD);
    // Every chunk of every tensor in order, (job, first element): the pass takes them
    // `window` at a time across tensors (most tensors are a chunk or three, so groups within
    // one tensor left a core idle), and stores each group's changes in order while the next
    // group is compared.
    let window = 8 * rayon::current_num_threads().max(1);
    let items: Vec<(usize, usize)> = jobs
        .iter()
        .enumerate()
        .flat_map(|(j, job)| {
            (0..job.a.1.numel as usize)
                .step_by(CHUNK)
                .map(move |s| (j, s))
        })
        .collect();
    // Each chunk's stretches of both files, for the readers that read cold files ahead.
    let stretches = items.iter().map(|&(j, s)| {
        let job = &jobs[j];
        let len = CHUNK.min(job.a.1.numel as usize - s);
        [job.a, job.b]
            .map(|(shard, t)| readahead::Stretch {
                shard,
                offset: t.offset + s * t.dtype.size(),
                len: len * t.dtype.size(),
            })
            .to_vec()
    });
    let mut spans: Vec<Span> = jobs
        .iter()
        .map(|job| Span {
            changed: 0,
            wide: index_width(job.a.1.numel) == 8,
            idx_at: 0,
            val_at: 0,
            stored: 0,
            frames: Vec::new(),
            prints: (Vec::new(), Vec::new()),
        })
        .collect();
    // One chunk compared: its changes (indices and values, or a compact frame) and the
    // digests of its leaves on both sides.
    let chunk = |&(j, s): &(usize, usize)| -> Result<Part> {
        progress.check()?;
        let job = &jobs[j];
        let (t, size) = (job.a.1, job.a.1.dtype.size());
        let wide = index_width(t.numel) == 8;
        let len = CHUNK.min(t.numel as usize - s);
        let (x, y) = (
            &job.a.0.bytes(job.a.1)[s * size..(s + len) * size],
            &job.b.0.bytes(job.b.1)[s * size..(s + len) * size],
        );
        let (mut idx, mut vals) = (Vec::new(), Vec::new());
        // A leaf of each side at a time: compared, then hashed for the fingerprints while it
        // is in the cache.
        let leaves = x.len().div_ceil(LEAF);
        let mut prints = (Vec::with_capacity(leaves), Vec::with_capacity(leaves));
        for (k, (x, y)) in x.chunks(LEAF).zip(y.chunks(LEAF)).enumerate() {
            let first = (s + k * (LEAF / size)) as u64;
            let (px, py) = compare_leaf(x, y, size, first, wide, &mut idx, &mut vals);
            prints.0.push(px);
            prints.1.push(py);
        }
        let count = (vals.len() / size.max(1)) as u64;
        if codec == Codec::Compact && count > 0 {
            // Offsets from the chunk's first element; the frame replaces both.
            let s = s as u64;
            vals = if wide {
                let offsets = idx
                    .chunks_exact(8)
                    .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) - s);
                crate::codec::encode(offsets, &vals, size)
            } else {
                let offsets = idx
                    .chunks_exact(4)
                    .map(|b| u64::from(u32::from_le_bytes(b.try_into().expect("4 bytes"))) - s);
                crate::codec::encode(offsets, &vals, size)
            };
            idx.clear();
        }
        progress
            .done
            .fetch_add(2 * x.len() as u64, Ordering::Relaxed);
        job.a.0.check_faults()?;
        job.b.0.check_faults()?;
        Ok(Part {
            job: j,
            start: s as u64,
            count,
            idx,
            vals,
            prints,
        })
    };
    // Stores compared chunks' changes in the scratch files, in order.
    let store = |spans: &mut Vec<Span>, files: [&mut Scratch; 2], parts: Vec<Part>| {
        let [idx_file, val_file] = files;
        for part in parts {
            let span = &mut spans[part.job];
            span.prints.0.extend(part.prints.0);
            span.prints.1.extend(part.prints.1);
            if part.count == 0 {
                continue;
            }
            if span.stored == 0 {
                (span.idx_at, span.val_at) = (idx_file.len, val_file.len);
            }
            span.changed += part.count;
            span.stored += (part.idx.len() + part.vals.len()) as u64;
            if codec == Codec::Compact {
                span.frames.push(Frame {
                    start: part.start,
                    count: part.count,
                    bytes: part.vals.len() as u64,
                });
            }
            idx_file.write(out, &part.idx)?;
            val_file.write(out, &part.vals)?;
        }
        Ok::<(), Error>(())
    };
    readahead::ahead(stretches, |took| -> Result<()> {
        let mut pending = Vec::new();
        for (g, group) in items.chunks(window).enumerate() {
            (g * window..g * window + group.len()).for_each(took);
            let (stored, parts) = rayon::join(
                || {
                    let done = std::mem::take(&mut pending);
                    store(&mut spans, [&mut idx_file, &mut val_file], done)
                },
                || group.par_iter().map(chunk).collect::<Result<Vec<_>>>(),
            );
            stored?;
            pending = parts?;
        }
        store(&mut spans, [&mut idx_file, &mut val_file], pending)
    })?;
    for f in [&mut idx_file, &mut val_file] {
        f.flush(out)?;
    }

    let prints: Vec<(String, String)> = spans
        .iter()
        .zip(&jobs)
        .map(|(s, j)| {
            let len = j.a.1.len as u64;
            (root(&s.prints.0, len), root(&s.prints.1, len))
        })
        .collect();
    check_all_unchanged(jobs.iter().flat_map(|j| [j.a.0, j.b.0]))?;
    let mut entries = BTreeMap::new();
    for ((job, span), (fa, fb)) in jobs.iter().zip(&spans).zip(prints) {
        let (t, changed) = (job.a.1, span.changed);
        let compact =
            (codec == Codec::Compact).then(|| span.stored + 24 * span.frames.len() as u64);
        let (form, _) = choose_form(changed, t.numel, t.dtype.size() as u64, compact);
        entries.insert(
            job.name.to_string(),
            Entry {
                shape: t.shape.clone(),
                dtype: t.dtype.to_string(),
                changed,
                form,
                base: fa,
                tuned: fb,
            },
        );
    }

    // The file is written and synced while another core takes the inputs' pages out of this
    // process's page tables (unmapping a pair's populated pages is about as long as writing
    // and syncing a 1% patch; left to the checkpoints' drop it came after, on one core).
    let (written, ()) = rayon::join(
        || {
            let file = write_file(
                out,
                &jobs,
                &spans,
                &entries,
                codec,
                provenance,
                [&idx_file, &val_file],
            )?;
            check_all_unchanged(jobs.iter().map(|j| j.b.0))?;
            progress.check()?; // the last moment a cancel leaves nothing behind
            file.finish()
        },
        || release_inputs(&jobs, &entries),
    );
    Ok(Created {
        entries,
        bytes: written?,
    })
}

/// Drops the pass's pages of both sides from this process's page tables
/// ([`Shard::release`]), each shard's tensors in as few ranges as they are contiguous; tensors
/// the patch stores dense are kept (the file is assembled from them).
fn release_inputs(jobs: &[Job], entries: &BTreeMap<String, Entry>) {
    let mut ranges: Vec<(&Shard, usize, usize)> = Vec::with_capacity(2 * jobs.len());
    for job in jobs {
        ranges.push((job.a.0, job.a.1.offset, job.a.1.offset + job.a.1.len));
        if entries[job.name].form != Form::Dense {
            ranges.push((job.b.0, job.b.1.offset, job.b.1.offset + job.b.1.len));
        }
    }
    ranges.sort_by_key(|&(shard, start, _)| (std::ptr::from_ref(shard) as usize, start));
    let mut merged: Vec<(&Shard, usize, usize)> = Vec::new();
    for (shard, start, end) in ranges {
        match merged.last_mut() {
            Some((s, _, e)) if std::ptr::eq(*s, shard) && *e == start => *e = end,
            _ => merged.push((shard, start, end)),
        }
    }
    for (shard, start, end) in merged {
        shard.release(start, end - start);
    }
}

/// Assembles the patch file from the pass's spans and scratch files (stage three of
/// [`create`]), under its temporary name: the caller puts it in place.
fn write_file(
    out: &Path,
    jobs: &[Job],
    spans: &[Span],
    entries: &BTreeMap<String, Entry>,
    codec: Codec,
    provenance: &BTreeMap<String, String>,
    [idx_file, val_file]: [&Scratch; 2],
) -> Result<AtomicFile> {
    // The file: stored tensors ordered by alignment (8, 4, 2, 1 bytes), so that each stays
    // aligned to its element size behind the 8-byte-padded header.
    enum Source {
        Indices(u64, u64),
        Values(u64, u64),
        Dense(usize),
        /// Bytes made here: a frame table, or decoded indices and values.
        Table(Vec<u8>),
    }
    let mut stored: Vec<(String, Dtype, Vec<u64>, u64, Source)> = Vec::new();
    for (k, (job, span)) in jobs.iter().zip(spans).enumerate() {
        let e = &entries[job.name];
        let (dtype, size, changed) = (job.a.1.dtype, job.a.1.dtype.size() as u64, span.changed);
        match (e.form, codec) {
            (Form::None, _) => {}
            (Form::Dense, _) => stored.push((
                format!("{}.dense", job.name),
                dtype,
                e.shape.clone(),
                job.a.1.len as u64,
                Source::Dense(k),
            )),
            (Form::Sparse, _) => {
                let (idt, iw) = if span.wide {
                    (Dtype::I64, 8)
                } else {
                    (Dtype::I32, 4)
                };
                let (idx, vals) = if codec == Codec::Plain {
                    (
                        Source::Indices(span.idx_at, changed * iw),
                        Source::Values(span.val_at, changed * size),
                    )
                } else {
                    // Frames larger than plain indices and values (few changes): decoded
                    // from the scratch file and stored plain.
                    let (idx, vals) = span.decode(val_file, out, size as usize, job.a.1.numel)?;
                    let idx = idx
                        .iter()
                        .flat_map(|&i| i.to_le_bytes()[..iw as usize].to_vec())
                        .collect();
                    (Source::Table(idx), Source::Table(vals))
                };
                stored.push((
                    format!("{}.indices", job.name),
                    idt,
                    vec![changed],
                    changed * iw,
                    idx,
                ));
                stored.push((
                    format!("{}.values", job.name),
                    dtype,
                    vec![changed],
                    changed * size,
                    vals,
                ));
            }
            (Form::Compact, _) => {
                let table: Vec<u8> = span
                    .frames
                    .iter()
                    .flat_map(|f| [f.start, f.count, f.bytes])
                    .flat_map(|v| (v as i64).to_le_bytes())
                    .collect();
                stored.push((
                    format!("{}.frames", job.name),
                    Dtype::I64,
                    vec![span.frames.len() as u64, 3],
                    table.len() as u64,
                    Source::Table(table),
                ));
                stored.push((
                    format!("{}.compact", job.name),
                    Dtype::U8,
                    vec![span.stored],
                    span.stored,
                    Source::Values(span.val_at, span.stored),
                ));
            }
        }
    }
    stored.sort_by_key(|s| std::cmp::Reverse(s.1.size()));
    let mut metadata = provenance.clone();
    metadata.insert("format".into(), FORMAT.into());
    metadata.insert("version".into(), VERSION.into());
    metadata.insert("codec".into(), codec.name().into());
    metadata.insert(
        "tensors".into(),
        serde_json::to_string(&entries).expect("serialisable"),
    );
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::to_value(&metadata).expect("strings"),
    );
    let mut offset = 0u64;
    for (name, dtype, shape, len, _) in &stored {
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype.name(), "shape": shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut text = serde_json::to_vec(&header).expect("serialisable");
    text.resize(text.len().div_ceil(8) * 8, b' ');
    check_header_len(out, text.len() as u64, entries.len())?;

    let mut file = AtomicFile::create(out)?;
    file.write(&(text.len() as u64).to_le_bytes())?;
    file.write(&text)?;
    for (_, _, _, _, source) in &stored {
        match source {
            Source::Indices(at, len) => idx_file.copy_into(&mut file, *at, *len)?,
            Source::Values(at, len) => val_file.copy_into(&mut file, *at, *len)?,
            Source::Dense(k) => file.write(jobs[*k].b.0.bytes(jobs[*k].b.1))?,
            Source::Table(bytes) => file.write(bytes)?,
        }
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::{
        changed_into, changed_into_impl, compare_leaf, differing_bytes, leaf, AtomicFile, Scratch,
        Sink, LEAF,
    };

    /// Changes held in memory, then spilled to a file past the limit, read back and copied into
    /// a file whole across the spill; the spill file goes with the scratch.
    #[test]
    fn scratch_holds_then_spills() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("p.rlpatch");
        let want: Vec<u8> = (0..1000u32).map(|i| (i * 7 % 251) as u8).collect();
        for limit in [0, 100, 5000] {
            let mut s = Scratch::new("values", limit);
            for piece in want.chunks(37) {
                s.write(&out, piece).unwrap();
            }
            s.flush(&out).unwrap();
            assert_eq!(s.spill.is_some(), limit < want.len(), "limit {limit}");
            for (at, len) in [(0, 1000), (90, 30), (999, 1), (500, 0)] {
                let got = s.read(&out, at as u64, len as u64).unwrap();
                assert_eq!(&got[..], &want[at..at + len], "limit {limit}");
            }
            let mut f = AtomicFile::create(&out).unwrap();
            s.copy_into(&mut f, 3, 900).unwrap();
            s.copy_into(&mut f, 0, 3).unwrap();
            f.finish().unwrap();
            let written = std::fs::read(&out).unwrap();
            assert_eq!(written, [&want[3..903], &want[..3]].concat());
            drop(s);
            let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
            assert_eq!(left.len(), 1, "only the patch is left (limit {limit})");
            std::fs::remove_file(&out).unwrap();
        }
    }

    /// The changed elements found a block at a time equal a plain loop's, for every element
    /// size, lengths around the blocks' and spans' ends, sparse and dense changes (in any byte
    /// of an element), both index widths, appended after what the buffers hold.
    #[test]
    fn changed_elements_against_a_plain_loop() {
        let mut next = crate::testing::xorshift(0x2545_F491_4F6C_DD1Du64);
        for size in [1usize, 2, 4, 8] {
            for n in [0usize, 1, 7, 31, 64, 65, 1000, 8191, 8192 + 3, 20_000] {
                for share in [0.0, 0.01, 0.3, 1.0] {
                    let a: Vec<u8> = (0..n * size).map(|_| next() as u8).collect();
                    let mut b = a.clone();
                    for e in 0..n {
                        if ((next() % 1000) as f64) < share * 1000.0 {
                            b[e * size + (next() as usize % size)] ^= 1 + (next() % 255) as u8;
                        }
                    }
                    for wide in [false, true] {
                        let first = 5_000_000u64;
                        let (mut idx, mut vals) = (vec![9u8; 3], vec![7u8; 5]);
                        changed_into(&a, &b, size, first, wide, &mut idx, &mut vals);
                        // The portable path too (the dispatch takes AVX2 where there is).
                        let (mut idx2, mut vals2) = (vec![9u8; 3], vec![7u8; 5]);
                        by_size!(
                            size,
                            changed_into_impl(
                                &a,
                                &b,
                                Sink::new(first, wide, &mut idx2, &mut vals2),
                                differing_bytes
                            )
                        );
                        assert_eq!((&idx, &vals), (&idx2, &vals2));
                        let (mut want_i, mut want_v) = (vec![9u8; 3], vec![7u8; 5]);
                        for e in 0..n {
                            let (x, y) = (&a[e * size..][..size], &b[e * size..][..size]);
                            if x != y {
                                let i = first + e as u64;
                                want_i.extend_from_slice(
                                    &i.to_le_bytes()[..if wide { 8 } else { 4 }],
                                );
                                want_v.extend_from_slice(y);
                            }
                        }
                        assert_eq!(idx, want_i, "size {size}, {n} elements, {share}, {wide}");
                        assert_eq!(vals, want_v, "size {size}, {n} elements, {share}, {wide}");
                    }
                }
            }
        }
    }

    /// A whole leaf compared and hashed in one loop (the AVX2 path, where the CPU has it)
    /// finds the same changes as the portable compare and the same digests as `twox-hash`, for
    /// every element size, both index widths, and changes from none to all, in any byte.
    #[test]
    fn a_leaf_compared_and_hashed_at_once() {
        let mut next = crate::testing::xorshift(0x9E37_79B9_7F4A_7C15u64);
        let a = crate::testing::random_bytes(0x51_7CC1_B727_220Au64, LEAF);
        for size in [1usize, 2, 4, 8] {
            for share in [0.0, 0.001, 0.05, 0.5, 1.0] {
                let mut b = a.clone();
                for e in 0..LEAF / size {
                    if ((next() % 10_000) as f64) < share * 10_000.0 {
                        b[e * size + (next() as usize % size)] ^= 1 + (next() % 255) as u8;
                    }
                }
                for wide in [false, true] {
                    let first = 3_000_000u64;
                    let (mut idx, mut vals) = (vec![1u8; 2], vec![2u8; 3]);
                    let prints = compare_leaf(&a, &b, size, first, wide, &mut idx, &mut vals);
                    let (mut want_i, mut want_v) = (vec![1u8; 2], vec![2u8; 3]);
                    by_size!(
                        size,
                        changed_into_impl(
                            &a,
                            &b,
                            Sink::new(first, wide, &mut want_i, &mut want_v),
                            differing_bytes
                        )
                    );
                    assert_eq!(prints, (leaf(&a), leaf(&b)), "size {size}, {share}");
                    assert_eq!(
                        (idx, vals),
                        (want_i, want_v),
                        "size {size}, {share}, {wide}"
                    );
                }
            }
        }
    }
}

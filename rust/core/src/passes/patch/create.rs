//! Creating a patch: one streaming pass over both checkpoints, each tensor's changes written
//! into the patch as soon as its last chunk is compared ([`Assembly`]).

use super::apply::AtomicFile;
use super::fingerprint::{leaf, root, Leaf};
use super::*;
use crate::plan::{plan, PlanOptions};
use crate::safetensors::MAX_HEADER_LEN;

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

    /// Writes change `c` (index `i`, value `y`) into the buffers' free room `idx` and `vals`.
    #[inline(always)]
    fn put(idx: &mut [u8], vals: &mut [u8], wide: bool, c: usize, i: u64, y: &[u8; S]) {
        if wide {
            idx[c * 8..][..8].copy_from_slice(&i.to_le_bytes());
        } else {
            idx[c * 4..][..4].copy_from_slice(&(i as u32).to_le_bytes());
        }
        vals[c * S..][..S].copy_from_slice(y);
    }

    /// Element `e` (from the first) changed to `y`.
    #[inline(always)]
    fn push(&mut self, e: usize, y: &[u8; S]) {
        let (idx, vals) = (&mut self.idx[self.i0..], &mut self.vals[self.v0..]);
        Self::put(idx, vals, self.wide, self.count, self.first + e as u64, y);
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
        // The buffers' free room as slices, taken once per block: their bounds then stay in
        // registers (through the vectors, every byte written may alias their lengths, which
        // were loaded again for each change).
        let (wide, first, mut c) = (self.wide, self.first + (at / S) as u64, self.count);
        let (idx, vals) = (&mut self.idx[self.i0..], &mut self.vals[self.v0..]);
        while e != 0 {
            let p = e.trailing_zeros() as usize;
            // An element never straddles blocks: blocks start at multiples of 64 bytes.
            let y = y[p..p + S].try_into().expect("S bytes");
            Self::put(idx, vals, wide, c, first + (p / S) as u64, y);
            c += 1;
            e &= e - 1;
        }
        self.count = c;
    }

    /// Cuts the buffers to the changes found.
    #[inline(always)]
    fn finish(self) {
        let iw = self.iw();
        self.idx.truncate(self.i0 + self.count * iw);
        self.vals.truncate(self.v0 + self.count * S);
    }
}

/// Bytes of one tensor's changes held in memory while its chunks are stored (its stored pieces
/// are laid out once its count is known): as much as the read-ahead window. Past it, the
/// tensor is placed before it is done ([`Assembly::place`]).
const HELD: usize = 256 << 20;

/// What [`create`] did, per tensor of B (name as stored in B).
pub struct Created {
    pub entries: BTreeMap<String, Entry>,
    /// Size of the patch file.
    pub bytes: u64,
}

/// What became of a tensor whose held changes passed the limit.
#[derive(Default)]
enum Over {
    /// Held in memory.
    #[default]
    No,
    /// Plain codec, sparse: its changes were counted to its end (`total`) and room made for
    /// them; indices go to data offset `idx_at` and values to `val_at` as they come.
    Placed {
        total: u64,
        idx_at: u64,
        val_at: u64,
    },
    /// Plain codec, counted to its end (`total`) and stored whole: its changes are counted only.
    Dense { total: u64 },
    /// Compact codec: its frames are written from data offset `from` as they come.
    Streamed { from: u64 },
}

/// What has been stored of the tensor being assembled.
#[derive(Default)]
struct Open {
    changed: u64,
    /// Each stored chunk's indices and values (plain codec) or frame (compact: the second),
    /// in order, and the memory they take.
    parts: Vec<(Vec<u8>, Vec<u8>)>,
    held: usize,
    frames: Vec<Frame>,
    /// The digests of its leaves in base and in tuned, in order (see [`root`]).
    prints: (Vec<Leaf>, Vec<Leaf>),
    over: Over,
}

/// A stored tensor of the patch: key, dtype, shape, data offsets.
type Stored = (String, Dtype, Vec<u64>, [u64; 2]);

/// The patch file as the pass writes it (design §9, version 3): room for the header at the
/// front ([`header_room`]), then each tensor's stored pieces as soon as its last chunk is
/// stored (the pass stores chunks in order, so tensors finish in order), each tensor starting
/// on an 8-byte boundary and ending on one after a `NAME.pad` of up to 7 bytes, with its
/// piece of the larger element first, so every piece is aligned to its element size. Each
/// change is so written once, into the patch; memory holds at most [`HELD`] bytes of one
/// tensor's changes.
struct Assembly<'a> {
    jobs: &'a [Job<'a>],
    codec: Codec,
    out: &'a Path,
    /// [`HELD`] (less in tests).
    limit: usize,
    file: AtomicFile,
    /// Bytes kept for the header, a multiple of 8.
    room: u64,
    /// Stored tensors in file order.
    stored: Vec<Stored>,
    /// Data bytes laid out so far (past the header's room).
    at: u64,
    entries: BTreeMap<String, Entry>,
    /// The next tensor to finish, and what has been stored of it.
    next: usize,
    open: Open,
}

impl<'a> Assembly<'a> {
    fn new(
        jobs: &'a [Job<'a>],
        codec: Codec,
        out: &'a Path,
        limit: usize,
        room: u64,
    ) -> Result<Assembly<'a>> {
        let mut file = AtomicFile::create(out)?;
        file.skip(8 + room)?;
        Ok(Assembly {
            jobs,
            codec,
            out,
            limit,
            file,
            room,
            stored: Vec::new(),
            at: 0,
            entries: BTreeMap::new(),
            next: 0,
            open: Open::default(),
        })
    }

    /// Where data offset `at` is in the file.
    fn pos(&self, at: u64) -> u64 {
        8 + self.room + at
    }

    /// Appends `bytes`, one slice after another, as the stored tensor `key`.
    fn piece<'b>(
        &mut self,
        key: String,
        dtype: Dtype,
        shape: Vec<u64>,
        bytes: impl IntoIterator<Item = &'b [u8]>,
    ) -> Result<()> {
        let from = self.at;
        for b in bytes {
            self.file.write(b)?;
            self.at += b.len() as u64;
        }
        self.stored.push((key, dtype, shape, [from, self.at]));
        Ok(())
    }

    /// Pads to the next 8-byte boundary with `NAME.pad` (zeros).
    fn align(&mut self, name: &str) -> Result<()> {
        let pad = (8 - self.at % 8) % 8;
        if pad > 0 {
            let zeros = [0u8; 8];
            self.piece(
                format!("{name}.pad"),
                Dtype::U8,
                vec![pad],
                [&zeros[..pad as usize]],
            )?;
        }
        Ok(())
    }

    /// Appends tensor `name`'s table of compact `frames` (int64 rows: first element, changes,
    /// bytes).
    fn frame_table(&mut self, name: &str, frames: &[Frame]) -> Result<()> {
        let table: Vec<u8> = frames
            .iter()
            .flat_map(|f| [f.start, f.count, f.bytes])
            .flat_map(|v| (v as i64).to_le_bytes())
            .collect();
        let shape = vec![frames.len() as u64, 3];
        self.piece(format!("{name}.frames"), Dtype::I64, shape, [&table[..]])
    }

    /// Appends the whole tensor of `job` in C.
    fn dense(&mut self, job: &Job) -> Result<()> {
        let (shard, t) = job.b;
        self.piece(
            format!("{}.dense", job.name),
            t.dtype,
            t.shape.clone(),
            [shard.bytes(t)],
        )
    }

    /// Stores compared chunks' changes, in order, finishing each tensor with its last chunk.
    fn store(&mut self, parts: Vec<Part>) -> Result<()> {
        for part in parts {
            while self.next < part.job {
                self.finish_tensor()?; // tensors of no elements have no chunks
            }
            let t = self.jobs[part.job].a.1;
            let last = part.start + CHUNK as u64 >= t.numel;
            let (size, iw) = (t.dtype.size() as u64, index_width(t.numel) as u64);
            let o = &mut self.open;
            o.prints.0.extend(part.prints.0);
            o.prints.1.extend(part.prints.1);
            if part.count > 0 {
                if self.codec == Codec::Compact {
                    o.frames.push(Frame {
                        start: part.start,
                        count: part.count,
                        bytes: part.vals.len() as u64,
                    });
                }
                let done = o.changed;
                o.changed += part.count;
                match o.over {
                    Over::No => {
                        o.held += part.idx.capacity() + part.vals.capacity();
                        o.parts.push((part.idx, part.vals));
                        if o.held > self.limit && !last {
                            self.place(part.job, part.start + CHUNK as u64)?;
                        }
                    }
                    Over::Placed { idx_at, val_at, .. } => {
                        let (i, v) = (self.pos(idx_at + done * iw), self.pos(val_at + done * size));
                        self.file.write_at(i, &part.idx)?;
                        self.file.write_at(v, &part.vals)?;
                    }
                    Over::Dense { .. } => {}
                    Over::Streamed { .. } => {
                        self.file.write(&part.vals)?;
                        self.at += part.vals.len() as u64;
                    }
                }
            }
            if last {
                self.finish_tensor()?;
            }
        }
        Ok(())
    }

    /// The tensor being assembled (of job `j`) holds more changes than the limit, and its
    /// chunks from element `from` on are still to come. Compact: what it holds is written and
    /// the rest follows as it comes (it stays compact). Plain: its changes from `from` to its
    /// end are counted now (a compare without storing, on every core), so its form is known
    /// and room is made for its indices and values, which are written at their places as they
    /// come.
    fn place(&mut self, j: usize, from: u64) -> Result<()> {
        let job = &self.jobs[j];
        let t = job.a.1;
        let (size, iw) = (t.dtype.size() as u64, index_width(t.numel) as u64);
        let o = std::mem::take(&mut self.open);
        let mut open = Open {
            changed: o.changed,
            frames: o.frames,
            prints: o.prints,
            ..Open::default()
        };
        if self.codec == Codec::Compact {
            open.over = Over::Streamed { from: self.at };
            for (_, frame) in &o.parts {
                self.file.write(frame)?;
                self.at += frame.len() as u64;
            }
        } else {
            let s = (from * size) as usize;
            let rest = count_changed(
                &job.a.0.bytes(t)[s..],
                &job.b.0.bytes(job.b.1)[s..],
                size as usize,
            );
            let total = o.changed + rest;
            open.over = if choose_form(total, t.numel, size, None).0 == Form::Dense {
                Over::Dense { total }
            } else {
                // The piece of the larger element first: both stay aligned.
                let (idx_at, val_at) = if size >= iw {
                    (self.at + total * size, self.at)
                } else {
                    (self.at, self.at + total * iw)
                };
                self.file.skip(total * (iw + size))?;
                self.at += total * (iw + size);
                let (mut i, mut v) = (self.pos(idx_at), self.pos(val_at));
                for (idx, vals) in &o.parts {
                    self.file.write_at(i, idx)?;
                    self.file.write_at(v, vals)?;
                    (i, v) = (i + idx.len() as u64, v + vals.len() as u64);
                }
                Over::Placed {
                    total,
                    idx_at,
                    val_at,
                }
            };
        }
        self.open = open;
        Ok(())
    }

    /// Lays out the next tensor's stored pieces and describes it.
    fn finish_tensor(&mut self) -> Result<()> {
        let job = &self.jobs[self.next];
        self.next += 1;
        let o = std::mem::take(&mut self.open);
        let (name, t) = (job.name, job.a.1);
        let (size, iw) = (t.dtype.size() as u64, index_width(t.numel) as u64);
        let idt = if iw == 8 { Dtype::I64 } else { Dtype::I32 };
        let counted = |total: u64| {
            if o.changed == total {
                Ok(())
            } else {
                Err(Error::tensor(
                    &job.b.0.path,
                    name,
                    format!(
                        "changed while it was read: {total} changes counted ahead, {} found",
                        o.changed
                    ),
                ))
            }
        };
        let form = match o.over {
            Over::No => {
                let compact = (self.codec == Codec::Compact)
                    .then(|| blob_len(&o.frames) + 24 * o.frames.len() as u64);
                let form = choose_form(o.changed, t.numel, size, compact).0;
                match form {
                    Form::None => {}
                    Form::Dense => self.dense(job)?,
                    Form::Sparse => {
                        let parts = if self.codec == Codec::Compact {
                            // Frames larger than plain indices and values (few changes).
                            let frames = o.parts.iter().map(|(_, f)| &f[..]);
                            let (idx, vals) = decode(&o.frames, frames, size, t.numel)
                                .map_err(|why| Error::output(self.out, why))?;
                            let idx: Vec<u8> = idx
                                .iter()
                                .flat_map(|i| i.to_le_bytes()[..iw as usize].to_vec())
                                .collect();
                            vec![(idx, vals)]
                        } else {
                            o.parts
                        };
                        let shape = vec![o.changed];
                        let indices = (format!("{name}.indices"), idt, true);
                        let values = (format!("{name}.values"), t.dtype, false);
                        let pieces = if size >= iw {
                            [values, indices]
                        } else {
                            [indices, values]
                        };
                        for (key, dtype, first) in pieces {
                            let bytes =
                                parts.iter().map(|p| &(if first { &p.0 } else { &p.1 })[..]);
                            self.piece(key, dtype, shape.clone(), bytes)?;
                        }
                    }
                    Form::Compact => {
                        self.frame_table(name, &o.frames)?;
                        let blob = o.parts.iter().map(|(_, f)| &f[..]);
                        let len = vec![blob_len(&o.frames)];
                        self.piece(format!("{name}.compact"), Dtype::U8, len, blob)?;
                    }
                }
                form
            }
            Over::Placed {
                total,
                idx_at,
                val_at,
            } => {
                counted(total)?;
                let mut pieces = [
                    (format!("{name}.indices"), idt, idx_at, iw),
                    (format!("{name}.values"), t.dtype, val_at, size),
                ];
                pieces.sort_by_key(|p| p.2);
                for (key, dtype, at, width) in pieces {
                    self.stored
                        .push((key, dtype, vec![total], [at, at + total * width]));
                }
                Form::Sparse
            }
            Over::Dense { total } => {
                counted(total)?;
                self.dense(job)?;
                Form::Dense
            }
            Over::Streamed { from } => {
                let len = self.at - from;
                self.stored.push((
                    format!("{name}.compact"),
                    Dtype::U8,
                    vec![len],
                    [from, self.at],
                ));
                self.align(name)?;
                self.frame_table(name, &o.frames)?;
                Form::Compact
            }
        };
        self.align(name)?;
        let len = t.len as u64;
        self.entries.insert(
            name.to_string(),
            Entry {
                shape: t.shape.clone(),
                dtype: t.dtype.to_string(),
                changed: o.changed,
                form,
                base: root(&o.prints.0, len),
                tuned: root(&o.prints.1, len),
            },
        );
        Ok(())
    }

    /// Finishes the tensors still open and writes the header into its room (JSON padded with
    /// spaces): the file, under its temporary name, and every tensor's entry.
    fn finish(
        mut self,
        provenance: &BTreeMap<String, String>,
    ) -> Result<(AtomicFile, BTreeMap<String, Entry>)> {
        while self.next < self.jobs.len() {
            self.finish_tensor()?;
        }
        let mut text = header(
            &metadata(provenance, self.codec, &self.entries),
            &self.stored,
        );
        check_header_len(self.out, text.len() as u64, self.entries.len())?;
        if text.len() as u64 > self.room {
            return Err(Error::output(
                self.out,
                std::io::Error::other(format!(
                    "its header ({} bytes) outgrew the room kept for it ({} bytes)",
                    text.len(),
                    self.room
                )),
            ));
        }
        text.resize(self.room as usize, b' ');
        let mut head = self.room.to_le_bytes().to_vec();
        head.extend_from_slice(&text);
        self.file.write_at(0, &head)?;
        Ok((self.file, self.entries))
    }
}

/// Bytes of compact `frames`, one after another.
fn blob_len(frames: &[Frame]) -> u64 {
    frames.iter().map(|f| f.bytes).sum()
}

/// The changes in compact `frames` (their bytes in `blobs`, in order) of a tensor of `numel`
/// elements of `size` bytes, decoded: flat indices and values.
fn decode<'b>(
    frames: &[Frame],
    blobs: impl Iterator<Item = &'b [u8]>,
    size: u64,
    numel: u64,
) -> std::result::Result<(Vec<u64>, Vec<u8>), std::io::Error> {
    let (mut idx, mut vals) = (Vec::new(), Vec::new());
    for (k, frame) in blobs.enumerate() {
        crate::codec::decode_nth(frames, k, frame, size as usize, numel, &mut idx, &mut vals)
            .map_err(std::io::Error::other)?;
    }
    Ok((idx, vals))
}

/// Elements whose bits differ between `a` and `b` (of `size` bytes each), on every core.
fn count_changed(a: &[u8], b: &[u8], size: usize) -> u64 {
    a.par_chunks(CHUNK * size)
        .zip(b.par_chunks(CHUNK * size))
        .map(|(x, y)| {
            let (mut idx, mut vals) = (Vec::new(), Vec::new());
            changed_into(x, y, size, 0, true, &mut idx, &mut vals);
            (vals.len() / size) as u64
        })
        .sum()
}

/// A patch's `__metadata__`: `provenance`, format, version, codec and the tensors' entries.
fn metadata(
    provenance: &BTreeMap<String, String>,
    codec: Codec,
    entries: &BTreeMap<String, Entry>,
) -> BTreeMap<String, String> {
    let mut metadata = provenance.clone();
    metadata.insert("format".into(), FORMAT.into());
    metadata.insert("version".into(), VERSION.into());
    metadata.insert("codec".into(), codec.name().into());
    metadata.insert(
        "tensors".into(),
        serde_json::to_string(entries).expect("serialisable"),
    );
    metadata
}

/// A stored tensor's entry in a safetensors header, `"KEY":{...}`.
fn stored_json(key: &str, dtype: Dtype, shape: &[u64], span: [u64; 2]) -> String {
    let value = serde_json::json!({"dtype": dtype.name(), "shape": shape, "data_offsets": span});
    format!(
        "{}:{}",
        serde_json::to_string(key).expect("a string"),
        serde_json::to_string(&value).expect("serialisable")
    )
}

/// The JSON header of a patch with `metadata` and the `stored` tensors.
fn header(metadata: &BTreeMap<String, String>, stored: &[Stored]) -> Vec<u8> {
    let mut text = format!(
        "{{\"__metadata__\":{}",
        serde_json::to_string(metadata).expect("serialisable")
    );
    for (key, dtype, shape, span) in stored {
        text.push(',');
        text.push_str(&stored_json(key, *dtype, shape, *span));
    }
    text.push('}');
    text.into_bytes()
}

/// An upper bound on the header of the patch of `jobs` (a multiple of 8): the metadata with
/// every tensor's count at its number of elements and its form at the longest name, and per
/// tensor the longest set of stored pieces its codec allows, every number at the widest any
/// offset can be.
fn header_room(jobs: &[Job], codec: Codec, provenance: &BTreeMap<String, String>) -> u64 {
    let print = "0".repeat(32);
    let worst: BTreeMap<String, Entry> = jobs
        .iter()
        .map(|j| {
            let t = j.a.1;
            let entry = Entry {
                shape: t.shape.clone(),
                dtype: t.dtype.to_string(),
                changed: t.numel,
                form: Form::Compact,
                base: print.clone(),
                tuned: print.clone(),
            };
            (j.name.to_string(), entry)
        })
        .collect();
    // No offset is past the sum of every tensor's largest form: whole, plain, or compact
    // frames (each at most its varint gaps and values, as zstd bounds a frame, and its row).
    let most = |t: &TensorInfo| {
        let chunks = t.numel.div_ceil(CHUNK as u64);
        t.numel * (16 + 2 * t.dtype.size() as u64) + 256 * chunks + 8
    };
    let max: u64 = jobs.iter().map(|j| most(j.a.1)).sum();
    let stored: u64 = jobs
        .iter()
        .map(|j| {
            let (name, t) = (j.name, j.a.1);
            let len = |suffix: &str, dtype: Dtype, shape: &[u64]| {
                stored_json(&format!("{name}.{suffix}"), dtype, shape, [max, max]).len() as u64 + 1
            };
            let pad = len("pad", Dtype::U8, &[7]);
            let dense = len("dense", t.dtype, &t.shape);
            let plain = len("indices", Dtype::I64, &[t.numel]) + len("values", t.dtype, &[t.numel]);
            let chunks = t.numel.div_ceil(CHUNK as u64);
            let compact = match codec {
                Codec::Compact => {
                    len("frames", Dtype::I64, &[chunks, 3]) + len("compact", Dtype::U8, &[max])
                }
                Codec::Plain => 0,
            };
            dense.max(plain).max(compact) + pad
        })
        .sum();
    let room = header(&metadata(provenance, codec, &worst), &[]).len() as u64 + stored;
    room.div_ceil(8) * 8
}

/// One compared chunk of a tensor (of job `job`): its changes, as [`Assembly::store`] takes
/// them.
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

thread_local! {
    /// The share of elements changed in the last chunk this thread compared.
    static LAST_SHARE: std::cell::Cell<f64> = const { std::cell::Cell::new(0.0) };
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
    create_holding(
        base, tuned, out, name_map, codec, provenance, progress, HELD,
    )
}

/// [`create`] holding at most `limit` bytes of a tensor's changes in memory.
#[allow(clippy::too_many_arguments)]
fn create_holding(
    base: &Checkpoint,
    tuned: &Checkpoint,
    out: &Path,
    name_map: &[(String, String)],
    codec: Codec,
    provenance: &BTreeMap<String, String>,
    progress: &Progress,
    limit: usize,
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

    // The header's room is kept before the pass, so each tensor's pieces are written as it
    // finishes.
    let room = header_room(&jobs, codec, provenance).min(MAX_HEADER_LEN);
    let mut assembly = Assembly::new(&jobs, codec, out, limit, room)?;
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
        // Room for as many changes as this thread's last chunk had, and some: RL's changes
        // are spread evenly, so the buffers are rarely moved as they grow (each move copied
        // what they held).
        let expect = (LAST_SHARE.get() * 1.125 * len as f64) as usize + 1024;
        let iw = if wide { 8 } else { 4 };
        let (mut idx, mut vals) = (
            Vec::with_capacity(expect.min(len) * iw),
            Vec::with_capacity(expect.min(len) * size),
        );
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
        LAST_SHARE.set(count as f64 / len as f64);
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
            idx = Vec::new();
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
    readahead::ahead(stretches, |took| -> Result<()> {
        let mut pending = Vec::new();
        for (g, group) in items.chunks(window).enumerate() {
            (g * window..g * window + group.len()).for_each(took);
            let (stored, parts) = rayon::join(
                || assembly.store(std::mem::take(&mut pending)),
                || group.par_iter().map(chunk).collect::<Result<Vec<_>>>(),
            );
            stored?;
            pending = parts?;
        }
        assembly.store(pending)
    })?;
    check_all_unchanged(jobs.iter().flat_map(|j| [j.a.0, j.b.0]))?;

    // The header is written and the file synced while two threads take the inputs' pages out
    // of this process's page tables (unmapping a pair's populated pages is about as long as
    // syncing a 1% patch; left to the checkpoints' drop it came after, on one core).
    let (written, ()) = rayon::join(
        || {
            let (file, entries) = assembly.finish(provenance)?;
            progress.check()?; // the last moment a cancel leaves nothing behind
            Ok::<_, Error>(Created {
                bytes: file.finish()?,
                entries,
            })
        },
        || release_inputs(&jobs),
    );
    written
}

/// Drops the pass's pages of both sides from this process's page tables
/// ([`Shard::release`]), each shard's tensors in as few ranges as they are contiguous, cut in
/// 8 MiB blocks taken by two threads. (Unmapping each block behind the pass instead, as
/// `diff` does, made the pass longer by more than this takes: measured.)
fn release_inputs(jobs: &[Job]) {
    let mut ranges: Vec<(&Shard, usize, usize)> = Vec::with_capacity(2 * jobs.len());
    for job in jobs {
        for (shard, t) in [job.a, job.b] {
            ranges.push((shard, t.offset, t.offset + t.len));
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
    // In blocks, on two threads of their own: the unmapping (about as long as syncing a 1%
    // patch) is spread over the cores while the pass's thread waits for the sync.
    const BLOCK: usize = 8 << 20;
    let blocks: Vec<(&Shard, usize, usize)> = merged
        .into_iter()
        .flat_map(|(shard, start, end)| {
            (start..end)
                .step_by(BLOCK)
                .map(move |b| (shard, b, BLOCK.min(end - b)))
        })
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| {
                let mine = || blocks.get(next.fetch_add(1, Ordering::Relaxed));
                while let Some(&(shard, start, len)) = mine() {
                    shard.release(start, len);
                }
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::{
        changed_into, changed_into_impl, compare_leaf, create_holding, differing_bytes, leaf,
        Codec, Form, Sink, HELD, LEAF,
    };
    use crate::checkpoint::Checkpoint;
    use crate::diff::Progress;
    use crate::dtype::Dtype;
    use crate::patch::{apply, Patch};
    use crate::safetensors::Shard;
    use std::collections::BTreeMap;

    /// Tensors whose changes pass what is held in memory: in the plain codec counted to their
    /// end and placed (values first for 8-byte elements, indices first for 2-byte ones) or
    /// stored whole, in the compact codec streamed. At every limit the patch opens, holds
    /// exactly the changes a byte-by-byte compare finds, every stored tensor aligned to its
    /// element size, applies to the tuned checkpoint byte for byte, and nothing else is left
    /// beside it; in the plain codec every tensor takes the form it takes when held.
    #[test]
    fn tensors_past_the_held_limit_are_placed_or_streamed() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let mut next = crate::testing::xorshift(0xD1B5_4A32_D192_ED03);
        let n = (1usize << 20) + 4099; // two chunks
        let specs: [(&str, Dtype, usize, f64); 6] = [
            ("w.bf16", Dtype::BF16, n, 0.02),
            ("w.f64", Dtype::F64, (1 << 20) + 77, 0.03),
            ("w.dense", Dtype::BF16, (1 << 20) + 5, 0.6),
            ("w.i8", Dtype::I8, 21, 0.1),
            ("w.same", Dtype::U8, (1 << 20) + 1, 0.0),
            ("w.empty", Dtype::BF16, 0, 0.5),
        ];
        let (mut base, mut tuned) = (Vec::new(), Vec::new());
        for (name, dtype, numel, share) in specs {
            let size = dtype.size();
            let a = crate::testing::random_bytes(next(), numel * size);
            let mut b = a.clone();
            for e in 0..numel {
                if ((next() % 10_000) as f64) < share * 10_000.0 || (name == "w.i8" && e == 3) {
                    b[e * size + next() as usize % size] ^= 1 + (next() % 255) as u8;
                }
            }
            base.push((name, dtype, vec![numel as u64], a));
            tuned.push((name, dtype, vec![numel as u64], b));
        }
        for (side, tensors) in [("a", &base), ("b", &tuned)] {
            std::fs::create_dir(d.join(side)).unwrap();
            crate::testing::write_tensors(&d.join(side).join("model.safetensors"), tensors);
        }
        let (a, b) = (
            Checkpoint::open(&d.join("a")).unwrap(),
            Checkpoint::open(&d.join("b")).unwrap(),
        );
        let p = Progress::default();
        for codec in [Codec::Plain, Codec::Compact] {
            let mut held_forms = BTreeMap::new();
            for limit in [HELD, 0, 1000] {
                let tag = format!("{}-{limit}", codec.name());
                let out = d.join(format!("{tag}.rlpatch"));
                let made =
                    create_holding(&a, &b, &out, &[], codec, &BTreeMap::new(), &p, limit).unwrap();
                let patch = Patch::open(&out).unwrap();
                assert_eq!(patch.entries, made.entries, "{tag}");
                for t in &Shard::open(&out).unwrap().tensors {
                    assert_eq!(t.offset % t.dtype.size(), 0, "{tag}: {}", t.name);
                }
                for ((name, dtype, _, x), (_, _, _, y)) in base.iter().zip(&tuned) {
                    let size = dtype.size();
                    let want: Vec<u64> = (0..x.len() / size)
                        .filter(|&e| x[e * size..][..size] != y[e * size..][..size])
                        .map(|e| e as u64)
                        .collect();
                    let e = &patch.entries[*name];
                    assert_eq!(e.changed, want.len() as u64, "{tag}: {name}");
                    let got = patch.changes(name).unwrap();
                    match e.form {
                        Form::None => assert_eq!(got, None, "{tag}: {name}"),
                        Form::Dense => assert_eq!(got, Some((None, y.clone())), "{tag}: {name}"),
                        _ => {
                            let vals: Vec<u8> = want
                                .iter()
                                .flat_map(|&i| y[i as usize * size..][..size].to_vec())
                                .collect();
                            assert_eq!(got, Some((Some(want), vals)), "{tag}: {name}");
                        }
                    }
                }
                let forms: BTreeMap<String, Form> = patch
                    .entries
                    .iter()
                    .map(|(k, e)| (k.clone(), e.form))
                    .collect();
                if limit == HELD {
                    held_forms = forms;
                } else if codec == Codec::Plain {
                    assert_eq!(forms, held_forms, "{tag}");
                } else {
                    assert_eq!(
                        forms["w.dense"],
                        Form::Compact,
                        "{tag}: streamed, stays compact"
                    );
                }
                let rebuilt = d.join(format!("out-{tag}"));
                apply(&a, &[&patch], &rebuilt, &p).unwrap();
                assert_eq!(
                    std::fs::read(rebuilt.join("model.safetensors")).unwrap(),
                    std::fs::read(d.join("b/model.safetensors")).unwrap(),
                    "{tag}"
                );
            }
            if codec == Codec::Plain {
                assert_eq!(held_forms["w.dense"], Form::Dense);
            }
            assert_eq!(held_forms["w.same"], Form::None);
        }
        let mut left: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with("out-"))
            .collect();
        left.sort();
        assert_eq!(
            left.len(),
            2 + 6,
            "only the inputs and the patches: {left:?}"
        );
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

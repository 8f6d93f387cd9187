//! The comparison kernel: one streaming pass over two tensors' bytes that counts changed
//! elements for every threshold at once and can emit the packed changed-bits of one of them.
//!
//! Elements are widened to f32 bit patterns (f64 when either side is F64, raw bits for integer
//! dtypes) in blocks of 64 held on the stack; each block is then tested with straight-line loops
//! that the compiler vectorises. On x86-64 the whole loop is compiled twice, for the baseline
//! and for AVX2, and the AVX2 copy is chosen at run time when the CPU has it. The commonest
//! case (BF16 or F32 on every side, absolute or exact criterion, in a diff or a run) goes to
//! the hand-written AVX2 path in `crate::simd` where the CPU has it, which gives the same
//! counts and bits.

use crate::dtype::{widen, Dtype};

// The hand-written AVX2 path for BF16/F32 (see above).
#[cfg(target_arch = "x86_64")]
pub(crate) mod simd;

/// Elements per block; also the width of one mask word.
pub const BLOCK: usize = 64;

/// When two floating values count as unchanged (design §1). Identical bit patterns are always
/// unchanged; NaN against any other pattern is always changed.
#[derive(Debug, Clone, PartialEq)]
pub enum Criterion {
    /// `|a - b| <= tol`, one count per tolerance, all in the same pass.
    Absolute(Vec<f64>),
    /// Identical bit patterns only.
    Exact,
    /// `|a - b| <= eta * max(|a|, |b|)`, with a finite difference.
    Relative(f64),
}

/// The paper's absolute tolerance, the default.
pub const DEFAULT_TOL: f64 = 1e-5;

/// Criterion names as users write them.
pub const CRITERIA: [&str; 3] = ["absolute", "exact", "relative"];

impl Criterion {
    /// The criterion `name` from its arguments as a user gives them; the one place where they
    /// are parsed. `absolute` takes `tol` (default [`DEFAULT_TOL`]) and `more` tolerances
    /// computed in the same pass; `relative` takes `eta`; an argument the criterion would
    /// ignore is an error, never dropped. Returns the criterion (tolerances sorted, without
    /// repeats) and the index of the primary threshold (`tol`, `eta`, or 0 for exact).
    pub fn parse(
        name: &str,
        tol: Option<f64>,
        more: &[f64],
        eta: Option<f64>,
    ) -> crate::error::Result<(Criterion, usize)> {
        let invalid = |msg: String| Err(crate::error::Error::InvalidArgument(msg));
        if !CRITERIA.contains(&name) {
            return invalid(format!(
                "unknown criterion '{name}' ({})",
                CRITERIA.join(", ")
            ));
        }
        if name != "absolute" && (tol.is_some() || !more.is_empty()) {
            let hint = if name == "relative" { "; use eta" } else { "" };
            return invalid(format!(
                "tol and tolerances (--tol, --tolerances, --sweep) apply to the absolute criterion, not '{name}'{hint}"
            ));
        }
        if name != "relative" && eta.is_some() {
            return invalid(format!(
                "eta (--eta) applies to the relative criterion, not '{name}'"
            ));
        }
        let (crit, primary) = match name {
            "absolute" => {
                let tol = tol.unwrap_or(DEFAULT_TOL);
                let mut values: Vec<f64> = more.iter().copied().chain([tol]).collect();
                values.sort_by(f64::total_cmp);
                values.dedup_by(|a, b| a.to_bits() == b.to_bits());
                let k = values.iter().position(|v| v.to_bits() == tol.to_bits());
                (Criterion::Absolute(values), k.unwrap_or(0))
            }
            "exact" => (Criterion::Exact, 0),
            _ => match eta {
                Some(eta) => (Criterion::Relative(eta), 0),
                None => {
                    return invalid(
                        "the relative criterion needs eta (e.g. eta=1e-3, --eta 1e-3)".into(),
                    )
                }
            },
        };
        crit.check()?;
        Ok((crit, primary))
    }

    /// Checks the thresholds: at least one, each finite and non-negative.
    pub fn check(&self) -> crate::error::Result<()> {
        if self.thresholds() == 0 {
            return Err(crate::error::Error::InvalidArgument(
                "at least one tolerance is needed".into(),
            ));
        }
        if self
            .values()
            .into_iter()
            .any(|v| !(v.is_finite() && v >= 0.0))
        {
            return Err(crate::error::Error::InvalidArgument(
                "tolerances must be finite and non-negative".into(),
            ));
        }
        Ok(())
    }

    /// Number of counts the criterion produces per tensor.
    pub fn thresholds(&self) -> usize {
        match self {
            Criterion::Absolute(t) => t.len(),
            Criterion::Exact | Criterion::Relative(_) => 1,
        }
    }

    /// The threshold values as reported (0 for exact).
    pub fn values(&self) -> Vec<f64> {
        match self {
            Criterion::Absolute(t) => t.clone(),
            Criterion::Exact => vec![0.0],
            Criterion::Relative(eta) => vec![*eta],
        }
    }
}

/// Elements and changed elements per binade of the base value (design §8): bin `e` is the IEEE
/// biased exponent of `|a|` widened to f32 (0: zero or subnormal; 255: infinite or NaN).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hist {
    pub numel: Vec<u64>,
    /// One row of 256 bins per threshold.
    pub changed: Vec<Vec<u64>>,
}

impl Hist {
    /// Empty bins for `thresholds` thresholds.
    pub fn new(thresholds: usize) -> Hist {
        Hist {
            numel: vec![0; 256],
            changed: vec![vec![0; 256]; thresholds],
        }
    }

    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &Hist) {
        for (a, b) in self.numel.iter_mut().zip(&other.numel) {
            *a += b;
        }
        for (ra, rb) in self.changed.iter_mut().zip(&other.changed) {
            for (a, b) in ra.iter_mut().zip(rb) {
                *a += b;
            }
        }
    }
}

/// The f32 binade of an f32 bit pattern.
#[inline(always)]
fn binade32(bits: u32) -> usize {
    ((bits >> 23) & 0xff) as usize
}

/// The f32 binade of an f64 bit pattern: its exponent rebiased for f32, below f32's normal
/// range 0, above it (and infinite or NaN) 255.
#[inline(always)]
fn binade64(bits: u64) -> usize {
    let e = ((bits >> 52) & 0x7ff) as i64;
    if e == 0x7ff {
        return 255;
    }
    if e == 0 {
        return 0;
    }
    (e - 1023 + 127).clamp(0, 255) as usize
}

/// One stretch of two tensors to compare: `n` elements of `da` in `a`, of `db` in `b`.
pub(crate) struct Job<'a> {
    pub a: &'a [u8],
    pub b: &'a [u8],
    pub da: Dtype,
    pub db: Dtype,
    pub n: usize,
    /// Scaled FP8 codes in `a`: one scale per block of [`BLOCK`] elements, applied as
    /// [`load_scaled`] describes (see [`crate::fp8`]).
    pub fa: Option<&'a [f32]>,
    /// The same for `b`.
    pub fb: Option<&'a [f32]>,
}

impl<'a> Job<'a> {
    /// `n` elements of `da` in `a` against `n` of `db` in `b`, as stored.
    pub(crate) fn new(a: &'a [u8], da: Dtype, b: &'a [u8], db: Dtype, n: usize) -> Job<'a> {
        Job {
            a,
            b,
            da,
            db,
            n,
            fa: None,
            fb: None,
        }
    }
}

/// Adds the changed counts of `job` to `counts` (one per threshold) and, when `bits` is given,
/// writes the packed changed-bits of threshold `bits.1` (LSB-first, `n.div_ceil(64)` little-endian
/// u64 words; bits past `n` are zero). Non-floating pairs must be given `Criterion::Exact`.
pub(crate) fn compare_chunk(
    crit: &Criterion,
    job: &Job,
    counts: &mut [u64],
    bits: Option<(&mut [u8], usize)>,
    hist: Option<&mut Hist>,
) {
    #[cfg(target_arch = "x86_64")]
    {
        let plain = hist.is_none() && job.fa.is_none() && job.fb.is_none();
        if plain && crate::simd::handles(crit, job.da, job.db) && crate::simd::available() {
            let mut bits = bits;
            let reborrow = bits.as_mut().map(|(out, k)| (&mut **out, *k));
            let done = crate::simd::compare_blocks(crit, job, counts, reborrow);
            if done == job.n {
                return;
            }
            // The last, partial block: the portable kernel, from there on.
            let rest = Job::new(
                &job.a[done * job.da.size()..],
                job.da,
                &job.b[done * job.db.size()..],
                job.db,
                job.n - done,
            );
            let bits = bits.map(|(out, k)| (&mut out[done / 8..], k));
            return compare_chunk_impl(crit, &rest, counts, bits, None);
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: `compare_chunk_avx2` requires only the AVX2 extension, and the CPU has
            // just reported that it supports AVX2.
            return unsafe { compare_chunk_avx2(crit, job, counts, bits, hist) };
        }
    }
    compare_chunk_impl(crit, job, counts, bits, hist)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn compare_chunk_avx2(
    crit: &Criterion,
    job: &Job,
    counts: &mut [u64],
    bits: Option<(&mut [u8], usize)>,
    hist: Option<&mut Hist>,
) {
    compare_chunk_impl(crit, job, counts, bits, hist)
}

#[inline(always)]
fn compare_chunk_impl(
    crit: &Criterion,
    job: &Job,
    counts: &mut [u64],
    bits: Option<(&mut [u8], usize)>,
    hist: Option<&mut Hist>,
) {
    let wide =
        job.da == Dtype::F64 || job.db == Dtype::F64 || !job.da.is_float() || !job.db.is_float();
    if wide {
        lane64(crit, job, counts, bits, hist)
    } else {
        lane32(crit, job, counts, bits, hist)
    }
}

/// Loads `m` elements of `d` from `src` as f32 bit patterns; the rest of `out` is zeroed so a
/// short final block compares equal past its end.
#[inline(always)]
fn load32(d: Dtype, src: &[u8], out: &mut [u32; BLOCK], m: usize) {
    if m < BLOCK {
        out.fill(0);
    }
    match d {
        Dtype::BF16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = widen::bf16(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        Dtype::F32 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Dtype::F16 => {
            let t = widen::f16_table();
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = t[u16::from_le_bytes([c[0], c[1]]) as usize];
            }
        }
        Dtype::F8E4M3 | Dtype::F8E5M2 | Dtype::F8E4M3Fnuz | Dtype::F8E5M2Fnuz | Dtype::F8E8M0 => {
            let t = widen::f8_table(d);
            for (o, &c) in out.iter_mut().zip(src) {
                *o = t[c as usize];
            }
        }
        // The f32 lane is chosen only when both sides are floating and narrower than F64.
        _ => unreachable!("{d} is not carried in the f32 lane"),
    }
}

/// Loads `m` FP8 codes of `d` dequantised with one scale: `f32(code) * scale`, rounded once
/// ([`widen::fp8_value`] for the OCP formats, the widening table for AMD's FNUZ ones).
#[inline(always)]
pub(crate) fn load_scaled(d: Dtype, src: &[u8], scale: f32, out: &mut [u32; BLOCK], m: usize) {
    if m < BLOCK {
        out.fill(0);
    }
    match d {
        Dtype::F8E5M2 => {
            for (o, &c) in out.iter_mut().zip(src) {
                *o = (widen::fp8_value::<true>(c) * scale).to_bits();
            }
        }
        Dtype::F8E4M3 => {
            for (o, &c) in out.iter_mut().zip(src) {
                *o = (widen::fp8_value::<false>(c) * scale).to_bits();
            }
        }
        _ => {
            let t = widen::f8_table(d);
            for (o, &c) in out.iter_mut().zip(src) {
                *o = (f32::from_bits(t[c as usize]) * scale).to_bits();
            }
        }
    }
}

/// [`load_scaled`] widened to f64 bit patterns, for the f64 lane.
#[inline(always)]
fn load_scaled64(d: Dtype, src: &[u8], scale: f32, out: &mut [u64; BLOCK], m: usize) {
    let mut narrow = [0u32; BLOCK];
    load_scaled(d, src, scale, &mut narrow, m);
    for (o, &x) in out.iter_mut().zip(&narrow) {
        *o = widen::f32_to_f64_bits(x);
    }
}

/// Loads `m` elements of `d` as f64 bit patterns (floating dtypes) or raw zero-extended bits
/// (integer dtypes, compared bit for bit only).
#[inline(always)]
fn load64(d: Dtype, src: &[u8], out: &mut [u64; BLOCK], m: usize) {
    if m < BLOCK {
        out.fill(0);
    }
    match d {
        Dtype::F64 | Dtype::U64 | Dtype::I64 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(8)) {
                *o = u64::from_le_bytes(c.try_into().expect("8-byte chunk"));
            }
        }
        Dtype::U32 | Dtype::I32 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                *o = u32::from_le_bytes(c.try_into().expect("4-byte chunk")) as u64;
            }
        }
        Dtype::U16 | Dtype::I16 => {
            for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                *o = u16::from_le_bytes([c[0], c[1]]) as u64;
            }
        }
        Dtype::U8 | Dtype::I8 | Dtype::Bool => {
            for (o, &c) in out.iter_mut().zip(src) {
                *o = c as u64;
            }
        }
        Dtype::BF16
        | Dtype::F16
        | Dtype::F32
        | Dtype::F8E4M3
        | Dtype::F8E5M2
        | Dtype::F8E4M3Fnuz
        | Dtype::F8E5M2Fnuz
        | Dtype::F8E8M0 => {
            let mut narrow = [0u32; BLOCK];
            load32(d, src, &mut narrow, m);
            for (o, &x) in out.iter_mut().zip(&narrow) {
                *o = widen::f32_to_f64_bits(x);
            }
        }
        // MXFP4 codes are dequantised before they reach a kernel (`fp8::dequantise`), and
        // an F4 tensor without its scales is refused when the pairs are formed.
        Dtype::F4 => unreachable!("F4 codes reach the kernel dequantised"),
    }
}

/// Packs 64 zero-or-one bytes into a word, element i at bit i. Each multiply gathers the low
/// bits of 8 bytes into the top byte: byte j lands on bit 56 + j, and no two partial products
/// share a bit position, so nothing carries.
#[inline(always)]
fn pack(ch: &[u8; BLOCK]) -> u64 {
    let mut w = 0u64;
    for (j, c) in ch.chunks_exact(8).enumerate() {
        let x = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        w |= (x.wrapping_mul(0x0102_0408_1020_4080) >> 56) << (8 * j);
    }
    w
}

/// One lane width: `$F` values carried as `$U` bit patterns, loaded by `$load`.
///
/// For the absolute criterion the block is reduced to one distance per element, `|a - b|`, or
/// 0 where the bits are identical; an element is then changed at tolerance `t` iff
/// `!(d <= t)`, which also holds for a NaN distance. Every loop runs over 32- or 64-bit lanes
/// with fixed trip counts, so it vectorises.
macro_rules! lane {
    ($name:ident, $run:ident, $block:ident, $F:ty, $U:ty, $load:ident, $scaled:ident, $binade:ident) => {
        /// Compares one block of loaded values: adds its changed counts to `counts` and
        /// returns the packed changed-bits of threshold `mask_at` (0 when none is asked for).
        // `!(d <= t)` is meant: unlike `d > t`, it is true for a NaN difference.
        #[allow(clippy::neg_cmp_op_on_partial_ord, clippy::too_many_arguments)]
        #[inline(always)]
        fn $block(
            crit: &Criterion,
            tols: &[$F],
            ua: &[$U; BLOCK],
            ub: &[$U; BLOCK],
            d: &mut [$F; BLOCK],
            ch: &mut [u8; BLOCK],
            counts: &mut [u64],
            mask_at: Option<usize>,
        ) -> u64 {
            let mut word = 0u64;
            match crit {
                // Where the bits are asked for, the count is taken from them (one loop, not
                // two).
                Criterion::Exact => {
                    if mask_at.is_some() {
                        for i in 0..BLOCK {
                            ch[i] = (ua[i] != ub[i]) as u8;
                        }
                        word = pack(ch);
                        counts[0] += word.count_ones() as u64;
                    } else {
                        let mut acc = 0u32;
                        for i in 0..BLOCK {
                            acc += (ua[i] != ub[i]) as u32;
                        }
                        counts[0] += acc as u64;
                    }
                }
                Criterion::Absolute(_) => {
                    for i in 0..BLOCK {
                        let diff = (<$F>::from_bits(ua[i]) - <$F>::from_bits(ub[i])).abs();
                        d[i] = if ua[i] == ub[i] { 0.0 } else { diff };
                    }
                    for (k, &t) in tols.iter().enumerate() {
                        if mask_at == Some(k) {
                            for i in 0..BLOCK {
                                ch[i] = (!(d[i] <= t)) as u8;
                            }
                            word = pack(ch);
                            counts[k] += word.count_ones() as u64;
                        } else {
                            let mut acc = 0u32;
                            for i in 0..BLOCK {
                                acc += (!(d[i] <= t)) as u32;
                            }
                            counts[k] += acc as u64;
                        }
                    }
                }
                Criterion::Relative(_) => {
                    let eta = tols[0];
                    let mut acc = 0u32;
                    for i in 0..BLOCK {
                        let (x, y) = (<$F>::from_bits(ua[i]), <$F>::from_bits(ub[i]));
                        let diff = (x - y).abs();
                        let same = ua[i] == ub[i]
                            || (diff.is_finite() && diff <= eta * x.abs().max(y.abs()));
                        ch[i] = (!same) as u8;
                        acc += (!same) as u32;
                    }
                    counts[0] += acc as u64;
                    if mask_at.is_some() {
                        word = pack(ch);
                    }
                }
            }
            word
        }

        #[inline(always)]
        fn $name(
            crit: &Criterion,
            job: &Job,
            counts: &mut [u64],
            mut bits: Option<(&mut [u8], usize)>,
            mut hist: Option<&mut Hist>,
        ) {
            let (sa, sb) = (job.da.size(), job.db.size());
            let tols: Vec<$F> = thresholds(crit).iter().map(|&t| t as $F).collect();
            let mask_at = bits.as_ref().map(|(_, k)| *k);
            let mut ua = [0 as $U; BLOCK];
            let mut ub = [0 as $U; BLOCK];
            let mut d = [0 as $F; BLOCK];
            let mut ch = [0u8; BLOCK];
            // The lens's per-threshold bits and scratch counts, allocated only when asked for.
            let lens = if hist.is_some() { counts.len() } else { 0 };
            let (mut words, mut scratch) = (vec![0u64; lens], vec![0u64; lens]);
            for blk in 0..job.n.div_ceil(BLOCK) {
                let s = blk * BLOCK;
                let m = BLOCK.min(job.n - s);
                let (a, b) = (&job.a[s * sa..(s + m) * sa], &job.b[s * sb..(s + m) * sb]);
                match job.fa {
                    Some(f) => $scaled(job.da, a, f[blk], &mut ua, m),
                    None => $load(job.da, a, &mut ua, m),
                }
                match job.fb {
                    Some(f) => $scaled(job.db, b, f[blk], &mut ub, m),
                    None => $load(job.db, b, &mut ub, m),
                }
                let word = $block(crit, &tols, &ua, &ub, &mut d, &mut ch, counts, mask_at);
                if let Some((out, _)) = bits.as_mut() {
                    out[blk * 8..blk * 8 + 8].copy_from_slice(&word.to_le_bytes());
                }
                if let Some(h) = hist.as_mut() {
                    // The lens: each threshold's changed-bits (the block compared again, into
                    // scratch counts, where not already at hand), binned by the base value.
                    for (k, w) in words.iter_mut().enumerate() {
                        *w = if mask_at == Some(k) {
                            word
                        } else {
                            $block(
                                crit,
                                &tols,
                                &ua,
                                &ub,
                                &mut d,
                                &mut ch,
                                &mut scratch,
                                Some(k),
                            )
                        };
                    }
                    for (i, &a) in ua.iter().enumerate().take(m) {
                        let e = $binade(a);
                        h.numel[e] += 1;
                        for (row, w) in h.changed.iter_mut().zip(&words) {
                            row[e] += (w >> i) & 1;
                        }
                    }
                }
            }
        }

        /// [`compare_run`] in this lane: every block of the base and of each step is loaded
        /// (widened) once.
        #[inline(always)]
        fn $run(crit: &Criterion, run: &mut Run) {
            let tols: Vec<$F> = thresholds(crit).iter().map(|&t| t as $F).collect();
            let nbytes = run.n.div_ceil(BLOCK) * 8;
            let mut base = [0 as $U; BLOCK];
            let mut prev = [0 as $U; BLOCK];
            let mut cur = [0 as $U; BLOCK];
            let mut d = [0 as $F; BLOCK];
            let mut ch = [0u8; BLOCK];
            let (bd, bs) = (run.base.1, run.base.1.size());
            for blk in 0..run.n.div_ceil(BLOCK) {
                let s = blk * BLOCK;
                let m = BLOCK.min(run.n - s);
                $load(bd, &run.base.0[s * bs..(s + m) * bs], &mut base, m);
                if let Some((bytes, dt)) = run.previous {
                    let sz = dt.size();
                    $load(dt, &bytes[s * sz..(s + m) * sz], &mut prev, m);
                }
                for (j, &(bytes, dt)) in run.steps.iter().enumerate() {
                    let sz = dt.size();
                    $load(dt, &bytes[s * sz..(s + m) * sz], &mut cur, m);
                    let vs = &mut run.vs_base[j..j + 1];
                    let word = $block(crit, &tols, &base, &cur, &mut d, &mut ch, vs, Some(0));
                    let at = j * nbytes + blk * 8;
                    run.bits[at..at + 8].copy_from_slice(&word.to_le_bytes());
                    if j == 0 && run.previous.is_none() {
                        run.consecutive[0] += word.count_ones() as u64;
                    } else {
                        let cons = &mut run.consecutive[j..j + 1];
                        $block(crit, &tols, &prev, &cur, &mut d, &mut ch, cons, None);
                    }
                    std::mem::swap(&mut prev, &mut cur);
                }
            }
        }
    };
}

lane!(
    lane32,
    run32,
    block32,
    f32,
    u32,
    load32,
    load_scaled,
    binade32
);
lane!(
    lane64,
    run64,
    block64,
    f64,
    u64,
    load64,
    load_scaled64,
    binade64
);

/// The thresholds of a criterion in the kernel's terms (none for exact).
fn thresholds(crit: &Criterion) -> Vec<f64> {
    match crit {
        Criterion::Absolute(t) => t.clone(),
        Criterion::Exact => Vec::new(),
        Criterion::Relative(eta) => vec![*eta],
    }
}

/// One chunk of a run: the base's bytes and each step's, `n` elements each, all floating.
pub(crate) struct Run<'a, 'b> {
    pub base: (&'a [u8], Dtype),
    /// The checkpoint before the first step, when it is not the base.
    pub previous: Option<(&'a [u8], Dtype)>,
    pub steps: &'b [(&'a [u8], Dtype)],
    pub n: usize,
    /// Per step: changed against the base (added to).
    pub vs_base: &'b mut [u64],
    /// Per step: changed against the step before (the base before the first; added to).
    pub consecutive: &'b mut [u64],
    /// Per step `j`: the changed-bits against the base at `j * ceil(n / 64) * 8` (written).
    pub bits: &'b mut [u8],
}

/// Compares each step of `run` with the base (counts and bits) and with the step before it
/// (counts), at the one threshold of `crit`, loading every block of every input once.
pub(crate) fn compare_run<'a>(crit: &Criterion, run: &mut Run<'a, '_>) {
    #[cfg(target_arch = "x86_64")]
    {
        let dtypes = std::iter::once(run.base.1)
            .chain(run.previous.map(|p| p.1))
            .chain(run.steps.iter().map(|s| s.1));
        if crate::simd::handles_run(crit, dtypes) && crate::simd::available() {
            let done = crate::simd::run_blocks(crit, run);
            if done < run.n {
                // The last, partial block: the portable kernel, its bits copied into place.
                let k = run.steps.len();
                let nbytes = run.n.div_ceil(BLOCK) * 8;
                let from = |(bytes, d): (&'a [u8], Dtype)| (&bytes[done * d.size()..], d);
                let steps: Vec<(&[u8], Dtype)> = run.steps.iter().map(|&s| from(s)).collect();
                let mut bits = vec![0u8; k * 8];
                compare_run_impl(
                    crit,
                    &mut Run {
                        base: from(run.base),
                        previous: run.previous.map(from),
                        steps: &steps,
                        n: run.n - done,
                        vs_base: &mut *run.vs_base,
                        consecutive: &mut *run.consecutive,
                        bits: &mut bits,
                    },
                );
                for (j, word) in bits.chunks_exact(8).enumerate() {
                    let at = j * nbytes + done / 8;
                    run.bits[at..at + 8].copy_from_slice(word);
                }
            }
            return;
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: `compare_run_avx2` requires only the AVX2 extension, and the CPU has
            // just reported that it supports AVX2.
            return unsafe { compare_run_avx2(crit, run) };
        }
    }
    compare_run_impl(crit, run)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn compare_run_avx2(crit: &Criterion, run: &mut Run) {
    compare_run_impl(crit, run)
}

#[inline(always)]
fn compare_run_impl(crit: &Criterion, run: &mut Run) {
    // The f64 lane for F64, and for integers (scaled FP8 codes and scales as stored).
    let wide64 = |d: Dtype| d == Dtype::F64 || !d.is_float();
    let wide = wide64(run.base.1)
        || run.previous.is_some_and(|p| wide64(p.1))
        || run.steps.iter().any(|s| wide64(s.1));
    if wide {
        run64(crit, run)
    } else {
        run32(crit, run)
    }
}

/// Elements per binade of a floating tensor's values (`numel[e]`), and for each packed mask the
/// elements it holds per binade (`held[k][e]`): what the magnitude-matched overlap baseline
/// needs (design §8). `values` holds `numel` elements of `dtype`; each mask at least
/// `numel.div_ceil(8)` bytes, LSB-first.
pub fn binade_counts(
    values: &[u8],
    dtype: Dtype,
    masks: &[&[u8]],
    numel: usize,
) -> crate::error::Result<(Vec<u64>, Vec<Vec<u64>>)> {
    use rayon::prelude::*;
    if !dtype.is_float() {
        return Err(crate::error::Error::InvalidArgument(format!(
            "binades need a floating tensor, not {dtype}"
        )));
    }
    if values.len() != numel * dtype.size() {
        return Err(crate::error::Error::InvalidArgument(format!(
            "{} bytes of {dtype} cannot hold {numel} elements",
            values.len()
        )));
    }
    for m in masks {
        crate::bits::check_len(m, numel, "mask")?;
    }
    const SPAN: usize = 1 << 16; // elements per unit of parallel work (a multiple of BLOCK)
    let size = dtype.size();
    let wide = dtype == Dtype::F64;
    let zero = || (vec![0u64; 256], vec![vec![0u64; 256]; masks.len()]);
    let (numel_b, held) = (0..numel.div_ceil(SPAN))
        .into_par_iter()
        .map(|part| {
            let (mut n, mut h) = zero();
            let start = part * SPAN;
            let end = numel.min(start + SPAN);
            let mut narrow = [0u32; BLOCK];
            let mut broad = [0u64; BLOCK];
            for s in (start..end).step_by(BLOCK) {
                let m = BLOCK.min(end - s);
                let src = &values[s * size..(s + m) * size];
                let mut bins = [0usize; BLOCK];
                if wide {
                    load64(dtype, src, &mut broad, m);
                    for (b, &x) in bins.iter_mut().zip(&broad) {
                        *b = binade64(x);
                    }
                } else {
                    load32(dtype, src, &mut narrow, m);
                    for (b, &x) in bins.iter_mut().zip(&narrow) {
                        *b = binade32(x);
                    }
                }
                for (i, &b) in bins.iter().enumerate().take(m) {
                    n[b] += 1;
                    let at = s + i;
                    for (row, mask) in h.iter_mut().zip(masks) {
                        row[b] += ((mask[at >> 3] >> (at & 7)) & 1) as u64;
                    }
                }
            }
            (n, h)
        })
        .reduce(zero, |(mut n1, mut h1), (n2, h2)| {
            for (a, b) in n1.iter_mut().zip(&n2) {
                *a += b;
            }
            for (r1, r2) in h1.iter_mut().zip(&h2) {
                for (a, b) in r1.iter_mut().zip(r2) {
                    *a += b;
                }
            }
            (n1, h1)
        });
    Ok((numel_b, held))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bf16_bytes(v: &[u16]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn run(
        crit: &Criterion,
        da: Dtype,
        a: &[u8],
        db: Dtype,
        b: &[u8],
        n: usize,
    ) -> (Vec<u64>, Vec<u64>) {
        let mut counts = vec![0; crit.thresholds()];
        let mut bits = vec![0xffu8; n.div_ceil(64) * 8];
        let job = Job::new(a, da, b, db, n);
        compare_chunk(crit, &job, &mut counts, Some((&mut bits, 0)), None);
        // The baseline copy must agree with whichever copy the CPU picked.
        let mut c2 = vec![0; crit.thresholds()];
        let mut b2 = vec![0; n.div_ceil(64) * 8];
        compare_chunk_impl(crit, &job, &mut c2, Some((&mut b2, 0)), None);
        assert_eq!(counts, c2);
        assert_eq!(bits, b2);
        let words = bits
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        (counts, words)
    }

    #[test]
    fn bf16_special_values() {
        // 1.0, -0.0 vs +0.0, NaN vs NaN (same bits), NaN vs other NaN, Inf vs Inf, 1.0 vs next.
        let a = [0x3f80u16, 0x8000, 0x7fc0, 0x7fc0, 0x7f80, 0x3f80];
        let b = [0x3f80u16, 0x0000, 0x7fc0, 0x7fc1, 0x7f80, 0x3f81];
        let (ab, bb) = (bf16_bytes(&a), bf16_bytes(&b));
        let (c, bits) = run(&Criterion::Exact, Dtype::BF16, &ab, Dtype::BF16, &bb, 6);
        assert_eq!(c, vec![3]);
        assert_eq!(bits, vec![0b101010]);
        let (c, bits) = run(
            &Criterion::Absolute(vec![1e-5, 1.0]),
            Dtype::BF16,
            &ab,
            Dtype::BF16,
            &bb,
            6,
        );
        // -0 vs +0 is within any tolerance; NaN vs other NaN is never; 1.0 vs 1.0078125 only at 1.0.
        assert_eq!(c, vec![2, 1]);
        assert_eq!(bits, vec![0b101000]);
    }

    /// Values as f32 bit patterns, each near its predecessor in `near` (or near 1/128 without
    /// one) in the ways that matter to the kernels: identical, one BF16 unit or a few F32
    /// units away, sign flipped, a special value (both zeros, subnormals, infinities, NaNs of
    /// either sign and payload, neighbours), or anything.
    struct Noise(u64);

    impl Noise {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn series(&mut self, near: Option<&[u32]>, n: usize) -> Vec<u32> {
            const SPECIALS: [u32; 12] = [
                0x0000_0000,
                0x8000_0000,
                0x0001_0000,
                0x8001_0000,
                0x7f80_0000,
                0xff80_0000,
                0x7fc0_0000,
                0xffc1_0000,
                0x3f80_0000,
                0x3f81_0000,
                0x3727_c5ac,
                0x0080_0000,
            ];
            (0..n)
                .map(|i| {
                    let near = near.map_or(0x3c00_0000, |v| v[i]);
                    match self.next() % 6 {
                        0 => near,
                        1 => near.wrapping_add(0x1_0000),
                        2 => SPECIALS[(self.next() % 12) as usize],
                        3 => near ^ 0x8000_0000,
                        4 => near.wrapping_add((self.next() % 3) as u32),
                        _ => self.next() as u32,
                    }
                })
                .collect()
        }
    }

    /// BF16 (the top half) or F32 bytes of f32 bit patterns.
    fn encode(v: &[u32], d: Dtype) -> Vec<u8> {
        v.iter()
            .flat_map(|&x| match d {
                Dtype::BF16 => ((x >> 16) as u16).to_le_bytes().to_vec(),
                _ => x.to_le_bytes().to_vec(),
            })
            .collect()
    }

    /// The AVX2 path (taken by `compare_chunk` where the CPU has it) gives the portable
    /// kernel's counts and bits on every special value, at lengths ending mid-block.
    #[test]
    fn fast_path_matches_portable_kernel() {
        let mut noise = Noise(0x2545_f491_4f6c_dd1d);
        let crits = [
            Criterion::Exact,
            Criterion::Absolute(vec![0.0]),
            Criterion::Absolute(vec![1e-5]),
            Criterion::Absolute(vec![0.0, 1e-8, 1e-5, 0.0078125, 1e300]),
        ];
        for n in [0usize, 1, 63, 64, 65, 640, 1000] {
            let base = noise.series(None, n);
            let tuned = noise.series(Some(&base), n);
            for (da, db) in [
                (Dtype::BF16, Dtype::BF16),
                (Dtype::BF16, Dtype::F32),
                (Dtype::F32, Dtype::BF16),
                (Dtype::F32, Dtype::F32),
            ] {
                let (a, b) = (encode(&base, da), encode(&tuned, db));
                for crit in &crits {
                    for k in 0..crit.thresholds() {
                        let mut counts = vec![0; crit.thresholds()];
                        let mut bits = vec![0xa5u8; n.div_ceil(64) * 8];
                        let job = Job::new(&a, da, &b, db, n);
                        compare_chunk(crit, &job, &mut counts, Some((&mut bits, k)), None);
                        let mut c2 = vec![0; crit.thresholds()];
                        let mut b2 = vec![0x5au8; n.div_ceil(64) * 8];
                        compare_chunk_impl(crit, &job, &mut c2, Some((&mut b2, k)), None);
                        assert_eq!((&counts, &bits), (&c2, &b2), "{n} {da} {db} {crit:?} {k}");
                        let mut c3 = vec![0; crit.thresholds()];
                        compare_chunk(crit, &job, &mut c3, None, None);
                        assert_eq!(c3, c2);
                    }
                }
            }
        }
    }

    /// The AVX2 run path (taken by `compare_run` where the CPU has it) gives the portable
    /// run kernel's counts and bits, with and without a previous file, at lengths ending
    /// mid-block.
    #[test]
    fn fast_run_path_matches_portable_kernel() {
        let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
        for n in [1usize, 64, 100, 700] {
            let base = noise.series(None, n);
            let mut series = vec![noise.series(Some(&base), n)];
            for _ in 0..3 {
                let next = noise.series(series.last().map(Vec::as_slice), n);
                series.push(next);
            }
            let dtypes = [
                Dtype::BF16,
                Dtype::F32,
                Dtype::BF16,
                Dtype::BF16,
                Dtype::F32,
            ];
            let files: Vec<Vec<u8>> = std::iter::once(&base)
                .chain(&series)
                .zip(dtypes)
                .map(|(v, d)| encode(v, d))
                .collect();
            for crit in [
                Criterion::Exact,
                Criterion::Absolute(vec![0.0]),
                Criterion::Absolute(vec![1e-5]),
            ] {
                for with_previous in [false, true] {
                    let first = 1 + usize::from(with_previous);
                    let steps: Vec<(&[u8], Dtype)> = files[first..]
                        .iter()
                        .zip(&dtypes[first..])
                        .map(|(f, &d)| (f.as_slice(), d))
                        .collect();
                    let k = steps.len();
                    let nbytes = n.div_ceil(64) * 8;
                    let go = |portable: bool| {
                        let (mut vs, mut cons) = (vec![0; k], vec![0; k]);
                        let mut bits = vec![0x5au8; k * nbytes];
                        let mut run = Run {
                            base: (&files[0], dtypes[0]),
                            previous: with_previous.then(|| (files[1].as_slice(), dtypes[1])),
                            steps: &steps,
                            n,
                            vs_base: &mut vs,
                            consecutive: &mut cons,
                            bits: &mut bits,
                        };
                        if portable {
                            compare_run_impl(&crit, &mut run);
                        } else {
                            compare_run(&crit, &mut run);
                        }
                        (vs, cons, bits)
                    };
                    assert_eq!(go(false), go(true), "{n} {crit:?} {with_previous}");
                }
            }
        }
    }

    #[test]
    fn tail_bits_are_zero() {
        let n = 70;
        let a = vec![0u8; n * 4];
        let b = vec![1u8; n * 4];
        let (c, bits) = run(&Criterion::Exact, Dtype::F32, &a, Dtype::F32, &b, n);
        assert_eq!(c, vec![70]);
        assert_eq!(bits, vec![u64::MAX, 0b111111]);
    }

    #[test]
    fn mixed_width_and_integers() {
        // bf16 1.0 against f64 1.0 and 1.5.
        let a = bf16_bytes(&[0x3f80, 0x3f80]);
        let b: Vec<u8> = [1.0f64, 1.5].iter().flat_map(|x| x.to_le_bytes()).collect();
        let (c, _) = run(
            &Criterion::Absolute(vec![0.1]),
            Dtype::BF16,
            &a,
            Dtype::F64,
            &b,
            2,
        );
        assert_eq!(c, vec![1]);
        let a: Vec<u8> = [1i64, 2, 3].iter().flat_map(|x| x.to_le_bytes()).collect();
        let b: Vec<u8> = [1i64, 2, -3].iter().flat_map(|x| x.to_le_bytes()).collect();
        let (c, bits) = run(&Criterion::Exact, Dtype::I64, &a, Dtype::I64, &b, 3);
        assert_eq!((c, bits), (vec![1], vec![0b100]));
    }

    #[test]
    fn relative_needs_finite_difference() {
        let a: Vec<u8> = [100.0f32, f32::INFINITY, 1.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let b: Vec<u8> = [100.5f32, 1.0, 1.5]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let (c, bits) = run(
            &Criterion::Relative(0.01),
            Dtype::F32,
            &a,
            Dtype::F32,
            &b,
            3,
        );
        assert_eq!((c, bits), (vec![2], vec![0b110]));
    }

    /// The fused run kernel gives exactly what separate pairwise comparisons give, for every
    /// criterion, mixed dtypes and lengths that end mid-block.
    #[test]
    fn run_equals_pairwise_comparisons() {
        let mut next = crate::testing::xorshift(0x9e37_79b9_7f4a_7c15u64);
        for (n, dtypes) in [
            (
                1000usize,
                [Dtype::BF16, Dtype::BF16, Dtype::BF16, Dtype::BF16],
            ),
            (129, [Dtype::F32, Dtype::BF16, Dtype::F16, Dtype::F32]),
            (64, [Dtype::F64, Dtype::F32, Dtype::F64, Dtype::BF16]),
        ] {
            // Values near each other, so that tolerances matter; some identical.
            let base: Vec<f64> = (0..n).map(|i| (i as f64 * 0.37).sin()).collect();
            let series: Vec<Vec<f64>> = (0..3)
                .map(|_| {
                    base.iter()
                        .map(|&x| match next() % 4 {
                            0 => x,
                            1 => x + 1e-6,
                            2 => x * 1.01,
                            _ => x + 0.25,
                        })
                        .collect()
                })
                .collect();
            let encode = |v: &[f64], d: Dtype| -> Vec<u8> {
                v.iter()
                    .flat_map(|&x| match d {
                        Dtype::F64 => x.to_le_bytes().to_vec(),
                        Dtype::F32 => (x as f32).to_le_bytes().to_vec(),
                        Dtype::BF16 => (((x as f32).to_bits() >> 16) as u16).to_le_bytes().to_vec(),
                        Dtype::F16 => {
                            // Nearest f16 by search over the exact table (tests only).
                            let t = widen::f16_table();
                            let best = (0..=u16::MAX)
                                .filter(|&h| f32::from_bits(t[h as usize]).is_finite())
                                .min_by(|&p, &q| {
                                    let e =
                                        |h: u16| (f32::from_bits(t[h as usize]) as f64 - x).abs();
                                    e(p).total_cmp(&e(q))
                                })
                                .unwrap();
                            best.to_le_bytes().to_vec()
                        }
                        _ => unreachable!(),
                    })
                    .collect()
            };
            let base_b = encode(&base, dtypes[0]);
            let steps_b: Vec<Vec<u8>> = (0..3).map(|j| encode(&series[j], dtypes[j + 1])).collect();
            for crit in [
                Criterion::Absolute(vec![1e-5]),
                Criterion::Exact,
                Criterion::Relative(0.005),
            ] {
                let steps: Vec<(&[u8], Dtype)> = steps_b
                    .iter()
                    .zip(&dtypes[1..])
                    .map(|(b, &d)| (b.as_slice(), d))
                    .collect();
                let nbytes = n.div_ceil(64) * 8;
                let (mut vs, mut cons, mut bits) = (vec![0; 3], vec![0; 3], vec![0u8; 3 * nbytes]);
                compare_run(
                    &crit,
                    &mut Run {
                        base: (&base_b, dtypes[0]),
                        previous: None,
                        steps: &steps,
                        n,
                        vs_base: &mut vs,
                        consecutive: &mut cons,
                        bits: &mut bits,
                    },
                );
                for j in 0..3 {
                    let mut c = vec![0];
                    let mut b = vec![0u8; nbytes];
                    let job = Job::new(&base_b, dtypes[0], steps[j].0, steps[j].1, n);
                    compare_chunk(&crit, &job, &mut c, Some((&mut b, 0)), None);
                    assert_eq!(vs[j], c[0], "{crit:?} step {j}");
                    assert_eq!(&bits[j * nbytes..(j + 1) * nbytes], b.as_slice());
                    let (pa, pd) = if j == 0 {
                        (base_b.as_slice(), dtypes[0])
                    } else {
                        steps[j - 1]
                    };
                    let mut c = vec![0];
                    let job = Job::new(pa, pd, steps[j].0, steps[j].1, n);
                    compare_chunk(&crit, &job, &mut c, None, None);
                    assert_eq!(cons[j], c[0], "{crit:?} consecutive {j}");
                }
                assert!(vs.iter().any(|&v| v > 0) && vs.iter().any(|&v| (v as usize) < n));
            }
        }
    }

    #[test]
    fn criterion_arguments_are_parsed_in_one_place() {
        let (c, k) = Criterion::parse("absolute", None, &[], None).unwrap();
        assert_eq!((c, k), (Criterion::Absolute(vec![DEFAULT_TOL]), 0));
        let (c, k) = Criterion::parse("absolute", Some(1e-3), &[0.0, 1e-3, 1e-5], None).unwrap();
        assert_eq!((c, k), (Criterion::Absolute(vec![0.0, 1e-5, 1e-3]), 2));
        let (c, _) = Criterion::parse("relative", None, &[], Some(0.01)).unwrap();
        assert_eq!(c, Criterion::Relative(0.01));
        assert_eq!(
            Criterion::parse("exact", None, &[], None).unwrap().0,
            Criterion::Exact
        );
        let err = |n, t, m: &[f64], e| Criterion::parse(n, t, m, e).unwrap_err().to_string();
        assert!(err("fuzzy", None, &[], None).contains("unknown criterion 'fuzzy'"));
        assert!(err("exact", Some(0.1), &[], None).contains("not 'exact'"));
        assert!(err("relative", None, &[0.1], Some(0.1)).contains("; use eta"));
        assert!(err("absolute", None, &[], Some(0.1)).contains("eta (--eta) applies"));
        assert!(err("relative", None, &[], None).contains("needs eta"));
        assert!(err("absolute", Some(-1.0), &[], None).contains("non-negative"));
        assert!(err("absolute", None, &[f64::NAN], None).contains("finite"));
    }
}

//! The AVX2 path of the comparison kernels for their commonest case: BF16 or F32 on every
//! side, under the absolute or exact criterion (one tolerance in a run), with no magnitude
//! lens and no scales; [`compare_blocks`] for a diff's pair, [`run_blocks`] for a trajectory.
//!
//! Eight elements per step are widened to f32 bit patterns in a register, subtracted, compared
//! with every tolerance, and their changed bits taken with `movemask` (a block's 64 in two, after
//! packing; in the run kernel one per register): nothing is stored per element, and counts are
//! added once per block. Per element it does
//! the portable kernel's f32 operations (`|a - b|`, then `!(d <= t)`, identical bit patterns
//! unchanged), so the counts and bits are the same bit for bit; the tests hold the two paths
//! to each other on every special value.

use std::arch::x86_64::*;

use crate::dtype::Dtype;
use crate::kernel::{Criterion, Job, Run, BLOCK};

/// Whether this CPU runs the path (checked once by the standard library, then cached).
pub(crate) fn available() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("popcnt")
}

/// Whether the path handles a pair of these dtypes under `crit`.
pub(crate) fn handles(crit: &Criterion, da: Dtype, db: Dtype) -> bool {
    let narrow = |d: Dtype| d == Dtype::BF16 || d == Dtype::F32;
    narrow(da) && narrow(db) && matches!(crit, Criterion::Absolute(_) | Criterion::Exact)
}

/// Compares the whole blocks of `job` (BF16 or F32 on both sides, no scales), as
/// [`crate::kernel::compare_chunk`] does (counts added, mask words written at block `i`'s
/// `8 * i`), and returns how many elements it did: `job.n` rounded down to a whole block. The
/// caller checks [`available`] and [`handles`] first and compares the rest.
pub(crate) fn compare_blocks(
    crit: &Criterion,
    job: &Job,
    counts: &mut [u64],
    bits: Option<(&mut [u8], usize)>,
) -> usize {
    let (a, b, da, db) = (job.a, job.b, job.da, job.db);
    assert!(available() && handles(crit, da, db) && job.fa.is_none() && job.fb.is_none());
    let blocks = job.n / BLOCK;
    // The loads below read 64 elements of each side per block.
    assert!(a.len() >= blocks * BLOCK * da.size() && b.len() >= blocks * BLOCK * db.size());
    if let Some((out, _)) = &bits {
        assert!(out.len() >= blocks * 8);
    }
    let tols: Vec<f32> = match crit {
        Criterion::Absolute(t) => t.iter().map(|&t| t as f32).collect(),
        _ => Vec::new(),
    };
    assert_eq!(counts.len(), tols.len().max(1));
    // SAFETY: the CPU has AVX2 and POPCNT (asserted above), the only features `blocks_avx2`
    // enables; its loads stay inside `a` and `b` by the length assertions above.
    unsafe { blocks_avx2(&tols, a, da, b, db, blocks, counts, bits) };
    blocks * BLOCK
}

/// Eight elements of `d` at element `i` of `src`, as f32 bit patterns.
///
/// # Safety
/// The CPU must have AVX2, and `src` must hold elements `i..i + 8` of `d` (BF16 or F32).
#[inline(always)]
unsafe fn load8(d: Dtype, src: &[u8], i: usize) -> __m256i {
    if d == Dtype::BF16 {
        // SAFETY: 16 bytes from element i, inside `src` by the caller's promise.
        let h = unsafe { _mm_loadu_si128(src.as_ptr().add(2 * i).cast()) };
        _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h))
    } else {
        // SAFETY: 32 bytes from element i, inside `src` by the caller's promise.
        unsafe { _mm256_loadu_si256(src.as_ptr().add(4 * i).cast()) }
    }
}

/// [`compare_blocks`] proper.
///
/// # Safety
/// The CPU must have AVX2 and POPCNT; `a` and `b` must hold `blocks * 64` elements of `da` and
/// `db` (BF16 or F32); the mask output, when given, `blocks * 8` bytes; `counts` one entry
/// per tolerance (one for exact, when `tols` is empty).
#[target_feature(enable = "avx2,popcnt")]
#[allow(clippy::too_many_arguments)]
unsafe fn blocks_avx2(
    tols: &[f32],
    a: &[u8],
    da: Dtype,
    b: &[u8],
    db: Dtype,
    blocks: usize,
    counts: &mut [u64],
    mut bits: Option<(&mut [u8], usize)>,
) {
    let limits: Vec<__m256> = tols.iter().map(|&t| _mm256_set1_ps(t)).collect();
    let mask_at = bits.as_ref().map(|(_, k)| *k);
    for blk in 0..blocks {
        // SAFETY: block `blk` lies inside `a` and `b`, by the caller.
        let (x, y) = unsafe { (load_block(da, a, blk), load_block(db, b, blk)) };
        // Counts are added once per block and tolerance, from the block's word: an add to
        // memory per 8 elements would chain every step to the one before it.
        let mut word = 0u64;
        if limits.is_empty() {
            word = changed_word(&x, &y, None);
            counts[0] += u64::from(word.count_ones());
        } else {
            let dist = distances(&x, &y);
            for (k, (limit, count)) in limits.iter().zip(counts.iter_mut()).enumerate() {
                let changed = word_over(&dist, *limit);
                *count += u64::from(changed.count_ones());
                if mask_at == Some(k) {
                    word = changed;
                }
            }
        }
        if let Some((out, _)) = bits.as_mut() {
            out[blk * 8..blk * 8 + 8].copy_from_slice(&word.to_le_bytes());
        }
    }
}

/// The 64 lanes of eight all-ones-or-all-zeros registers as a word: lane `i` of register `g`
/// at bit `8 * g + i`. Four registers are narrowed to 32 bytes by two saturating packs (which
/// interleave their 128-bit halves), put back in order by one permute, and read by one
/// `movemask`.
#[target_feature(enable = "avx2")]
#[inline]
fn word_of(m: &[__m256i; BLOCK / 8]) -> u64 {
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let half = |m: &[__m256i]| {
        let lo = _mm256_packs_epi32(m[0], m[1]);
        let hi = _mm256_packs_epi32(m[2], m[3]);
        let bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(lo, hi), order);
        u64::from(_mm256_movemask_epi8(bytes) as u32)
    };
    half(&m[..4]) | half(&m[4..]) << 32
}

/// A block's distances: `|x - y|`, or 0 where the bits are identical (the portable kernel's
/// `d`).
#[target_feature(enable = "avx2")]
#[inline]
fn distances(x: &[__m256i; BLOCK / 8], y: &[__m256i; BLOCK / 8]) -> [__m256; BLOCK / 8] {
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let mut d = [_mm256_setzero_ps(); BLOCK / 8];
    for ((d, &x), &y) in d.iter_mut().zip(x).zip(y) {
        let same = _mm256_castsi256_ps(_mm256_cmpeq_epi32(x, y));
        let delta = _mm256_sub_ps(_mm256_castsi256_ps(x), _mm256_castsi256_ps(y));
        *d = _mm256_andnot_ps(same, _mm256_and_ps(delta, abs));
    }
    d
}

/// The bits of a block whose distance is over `limit`: not (d <= t), which is also true for a
/// NaN distance.
#[target_feature(enable = "avx2")]
#[inline]
fn word_over(dist: &[__m256; BLOCK / 8], limit: __m256) -> u64 {
    let mut over = [_mm256_setzero_si256(); BLOCK / 8];
    for (o, &d) in over.iter_mut().zip(dist) {
        *o = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_NLE_UQ>(d, limit));
    }
    word_of(&over)
}

/// Whether [`run_blocks`] handles a run of these dtypes (every file's) under `crit`.
pub(crate) fn handles_run(crit: &Criterion, mut dtypes: impl Iterator<Item = Dtype>) -> bool {
    let one = match crit {
        Criterion::Absolute(t) => t.len() == 1,
        Criterion::Exact => true,
        Criterion::Relative(_) => false,
    };
    one && dtypes.all(|d| d == Dtype::BF16 || d == Dtype::F32)
}

/// Compares the whole blocks of `run` as [`crate::kernel::compare_run`] does (each step with
/// the base, counts and bits, and with the step before it, counts), loading every block of
/// every file once, and returns how many elements it did: `run.n` rounded down to a whole
/// block. The caller checks [`available`] and [`handles_run`] first and compares the rest.
pub(crate) fn run_blocks(crit: &Criterion, run: &mut Run) -> usize {
    let dtypes = std::iter::once(run.base.1)
        .chain(run.previous.map(|p| p.1))
        .chain(run.steps.iter().map(|s| s.1));
    assert!(available() && handles_run(crit, dtypes));
    let blocks = run.n / BLOCK;
    let k = run.steps.len();
    let nbytes = run.n.div_ceil(BLOCK) * 8;
    // The loads below read 64 elements of every file per block.
    let holds = |(bytes, d): (&[u8], Dtype)| bytes.len() >= blocks * BLOCK * d.size();
    assert!(
        holds(run.base) && run.previous.is_none_or(holds) && run.steps.iter().all(|&s| holds(s))
    );
    assert!(run.vs_base.len() == k && run.consecutive.len() == k && run.bits.len() >= k * nbytes);
    let tol = match crit {
        Criterion::Absolute(t) => Some(t[0] as f32),
        _ => None,
    };
    // SAFETY: the CPU has AVX2 and POPCNT (asserted above), the only features `run_avx2`
    // enables; its loads stay inside every file's bytes by the length assertions above.
    unsafe { run_avx2(tol, run, blocks, nbytes) };
    blocks * BLOCK
}

/// One block (64 elements) of a file at block `blk`, as eight registers of f32 bit patterns.
///
/// # Safety
/// The CPU must have AVX2; `src` must hold the block's elements of `d` (BF16 or F32).
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn load_block(d: Dtype, src: &[u8], blk: usize) -> [__m256i; BLOCK / 8] {
    let mut out = [_mm256_setzero_si256(); BLOCK / 8];
    for (g, o) in out.iter_mut().enumerate() {
        // SAFETY: elements blk * 64 + 8 * g + 0..8 lie in the block, inside `src`.
        *o = unsafe { load8(d, src, blk * BLOCK + 8 * g) };
    }
    out
}

/// The changed bits of one block of `y` against `x`: with a tolerance, `!(|x - y| <= t)` where
/// the bits differ (as [`word_over`] tells); without, where the bits differ. One `movemask`
/// per register: in the run loop, with three blocks live, LLVM turns [`word_of`]'s packs into
/// byte inserts through the stack (1.7x slower there), so the run keeps this form.
#[target_feature(enable = "avx2")]
#[inline]
fn changed_word(x: &[__m256i; BLOCK / 8], y: &[__m256i; BLOCK / 8], limit: Option<__m256>) -> u64 {
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
    let mut word = 0u64;
    for (g, (&x, &y)) in x.iter().zip(y).enumerate() {
        let same = _mm256_castsi256_ps(_mm256_cmpeq_epi32(x, y));
        let changed = match limit {
            None => !_mm256_movemask_ps(same) as u8,
            Some(t) => {
                let delta = _mm256_sub_ps(_mm256_castsi256_ps(x), _mm256_castsi256_ps(y));
                let d = _mm256_andnot_ps(same, _mm256_and_ps(delta, abs));
                _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_NLE_UQ>(d, t)) as u8
            }
        };
        word |= u64::from(changed) << (8 * g);
    }
    word
}

/// [`run_blocks`] proper.
///
/// # Safety
/// The CPU must have AVX2 and POPCNT; every file of `run` must hold `blocks * 64` elements of
/// its dtype (BF16 or F32); `run.bits` `k * nbytes` bytes, `run.vs_base` and
/// `run.consecutive` one entry per step.
#[target_feature(enable = "avx2,popcnt")]
unsafe fn run_avx2(tol: Option<f32>, run: &mut Run, blocks: usize, nbytes: usize) {
    let limit = tol.map(|t| _mm256_set1_ps(t));
    for blk in 0..blocks {
        // SAFETY (of every load here): block `blk` lies inside every file, by the caller.
        let base = unsafe { load_block(run.base.1, run.base.0, blk) };
        let mut prev = match run.previous {
            Some((bytes, d)) => unsafe { load_block(d, bytes, blk) },
            None => base,
        };
        for (j, &(bytes, d)) in run.steps.iter().enumerate() {
            let cur = unsafe { load_block(d, bytes, blk) };
            let word = changed_word(&base, &cur, limit);
            run.vs_base[j] += u64::from(word.count_ones());
            let at = j * nbytes + blk * 8;
            run.bits[at..at + 8].copy_from_slice(&word.to_le_bytes());
            // The first step's predecessor is the base itself unless a previous file is given.
            let since = if j == 0 && run.previous.is_none() {
                word
            } else {
                changed_word(&prev, &cur, limit)
            };
            run.consecutive[j] += u64::from(since.count_ones());
            prev = cur;
        }
    }
}

//! Packed bit masks: element `i` at byte `i >> 3`, bit `i & 7` (LSB-first), read as little-endian
//! u64 words. Bits at positions `>= numel` are ignored on input and zero on output, wherever
//! the bytes came from. Inputs may sit at any alignment (memory-mapped files included).
//!
//! Counting and combining run in parallel over word ranges; on x86-64 the loops are also
//! compiled for AVX2 + POPCNT and that copy is chosen at run time.

use rayon::prelude::*;

use crate::error::{Error, Result};

/// Words per unit of parallel work (8 MiB of each input; tiny under test, so that small masks
/// cross several units).
const PAR_WORDS: usize = if cfg!(test) { 4 } else { 1 << 20 };

/// Bytes a packed mask of `numel` elements occupies in an `.rlmask` file: whole u64 words.
pub fn padded_len(numel: usize) -> usize {
    numel.div_ceil(64) * 8
}

/// Checks that `bytes` can hold `numel` bits.
pub fn check_len(bytes: &[u8], numel: usize, what: &str) -> Result<()> {
    if bytes.len() < numel.div_ceil(8) {
        return Err(Error::InvalidArgument(format!(
            "{what}: {} bytes cannot hold {numel} bits",
            bytes.len()
        )));
    }
    Ok(())
}

/// Word `w` of a mask of `numel` bits, zero-padded past the end of `bytes` and with the bits
/// past `numel` cleared. Used for the last word only; whole words take the fast path.
#[inline]
fn tail_word(bytes: &[u8], w: usize, numel: usize) -> u64 {
    let start = w * 8;
    let mut buf = [0u8; 8];
    let end = bytes.len().min(start + 8);
    if start < end {
        buf[..end - start].copy_from_slice(&bytes[start..end]);
    }
    let x = u64::from_le_bytes(buf);
    let used = numel - w * 64; // 1..=64
    if used >= 64 {
        x
    } else {
        x & ((1u64 << used) - 1)
    }
}

#[inline(always)]
fn word(bytes: &[u8], w: usize) -> u64 {
    u64::from_le_bytes(bytes[w * 8..w * 8 + 8].try_into().expect("8 bytes"))
}

/// Runs `f` (a loop over whole words) compiled for AVX2 + POPCNT when the CPU has them.
macro_rules! dispatch {
    ($f:ident($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,popcnt")]
            fn fast<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("popcnt") {
                // SAFETY: `fast` requires only AVX2 and POPCNT, which the CPU has just
                // reported that it supports.
                unsafe { fast(|| $f($($arg),*)) }
            } else {
                $f($($arg),*)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $f($($arg),*)
        }
    }};
}

#[inline(always)]
fn count_words(a: &[u8], words: std::ops::Range<usize>) -> u64 {
    words.map(|w| word(a, w).count_ones() as u64).sum()
}

#[inline(always)]
fn overlap_words(a: &[u8], b: &[u8], words: std::ops::Range<usize>) -> [u64; 3] {
    let mut c = [0u64; 3];
    for w in words {
        let (x, y) = (word(a, w), word(b, w));
        c[0] += x.count_ones() as u64;
        c[1] += y.count_ones() as u64;
        c[2] += (x & y).count_ones() as u64;
    }
    c
}

fn full_word_ranges(numel: usize) -> impl ParallelIterator<Item = std::ops::Range<usize>> {
    let full = numel / 64;
    (0..full.div_ceil(PAR_WORDS))
        .into_par_iter()
        .map(move |i| i * PAR_WORDS..full.min((i + 1) * PAR_WORDS))
}

/// Number of set bits among the first `numel`.
pub fn count(a: &[u8], numel: usize) -> Result<u64> {
    check_len(a, numel, "mask")?;
    let body: u64 = full_word_ranges(numel)
        .map(|r| dispatch!(count_words(a, r)))
        .sum();
    let tail = if !numel.is_multiple_of(64) {
        tail_word(a, numel / 64, numel).count_ones() as u64
    } else {
        0
    };
    Ok(body + tail)
}

/// `(|a|, |b|, |a ∩ b|)` over the first `numel` bits, in one pass over both.
pub fn overlap(a: &[u8], b: &[u8], numel: usize) -> Result<[u64; 3]> {
    check_len(a, numel, "first mask")?;
    check_len(b, numel, "second mask")?;
    let mut c = full_word_ranges(numel)
        .map(|r| dispatch!(overlap_words(a, b, r)))
        .reduce(|| [0; 3], |x, y| [x[0] + y[0], x[1] + y[1], x[2] + y[2]]);
    if !numel.is_multiple_of(64) {
        let w = numel / 64;
        let (x, y) = (tail_word(a, w, numel), tail_word(b, w, numel));
        c[0] += x.count_ones() as u64;
        c[1] += y.count_ones() as u64;
        c[2] += (x & y).count_ones() as u64;
    }
    Ok(c)
}

/// How masks are combined into a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Set in every input.
    And,
    /// Set in any input.
    Or,
    /// Set in an odd number of inputs.
    Xor,
    /// Set in the first input and in none of the others.
    Minus,
    /// Not set in the (single) input.
    Not,
    /// Set in at least `min_count` inputs.
    AtLeast(usize),
}

impl Op {
    /// Operation names as users write them.
    pub const NAMES: [&'static str; 6] = ["and", "or", "xor", "minus", "not", "consensus"];

    /// The operation `name` over `inputs` masks; the one place where operation names and
    /// `min_count` are checked: `consensus` needs `1 <= min_count <= inputs`, no other
    /// operation takes it, `not` takes one mask and the others at least two.
    pub fn parse(name: &str, min_count: Option<usize>, inputs: usize) -> Result<Op> {
        let invalid = |msg: String| Err(Error::InvalidArgument(msg));
        let op = match (name, min_count) {
            ("consensus", None) => {
                return invalid("consensus needs min_count (--min-count)".into())
            }
            ("consensus", Some(j)) if !(1..=inputs.max(1)).contains(&j) => {
                return invalid(format!(
                    "min_count must be between 1 and {}, not {j}",
                    inputs.max(1)
                ))
            }
            ("consensus", Some(j)) => Op::AtLeast(j),
            (n, Some(_)) if Self::NAMES.contains(&n) => {
                return invalid("min_count (--min-count) goes with consensus only".into())
            }
            ("and", None) => Op::And,
            ("or", None) => Op::Or,
            ("xor", None) => Op::Xor,
            ("minus", None) => Op::Minus,
            ("not", None) => Op::Not,
            (other, _) => {
                return invalid(format!(
                    "unknown operation '{other}' ({})",
                    Self::NAMES.join(", ")
                ))
            }
        };
        match (op, inputs) {
            (_, 0) => invalid(format!("{name} needs at least one mask")),
            (Op::Not, n) if n != 1 => invalid("not takes exactly one mask".into()),
            (Op::And | Op::Or | Op::Xor | Op::Minus, 1) => {
                invalid(format!("{name} needs at least two masks"))
            }
            _ => Ok(op),
        }
    }
}

/// Bit-sliced "at least j of these words": per bit position, whether `j` or more of the
/// inputs have it set. A vertical counter adds the words with ripple carries (about
/// `log2(n)` operations per input), then the counter is compared with `j` bit by bit.
#[inline(always)]
fn at_least(ws: &[u64], j: usize) -> u64 {
    let levels = (usize::BITS - ws.len().leading_zeros()) as usize; // bits to count 0..=n
    let mut counter = [0u64; usize::BITS as usize];
    for &x in ws {
        let mut carry = x;
        for c in counter.iter_mut().take(levels) {
            let next = *c & carry;
            *c ^= carry;
            carry = next;
            if carry == 0 {
                break;
            }
        }
    }
    if j > ws.len() {
        return 0;
    }
    let (mut gt, mut eq) = (0u64, u64::MAX);
    for (b, &c) in counter.iter().enumerate().take(levels).rev() {
        if (j >> b) & 1 == 1 {
            eq &= c;
        } else {
            gt |= eq & c;
            eq &= !c;
        }
    }
    gt | eq
}

#[inline(always)]
fn combine_word(op: Op, ws: &[u64]) -> u64 {
    match op {
        Op::And => ws.iter().fold(u64::MAX, |a, &x| a & x),
        Op::Or => ws.iter().fold(0, |a, &x| a | x),
        Op::Xor => ws.iter().fold(0, |a, &x| a ^ x),
        Op::Minus => ws[1..].iter().fold(ws[0], |a, &x| a & !x),
        Op::Not => !ws[0],
        Op::AtLeast(j) => at_least(ws, j),
    }
}

#[inline(always)]
fn combine_words(op: Op, inputs: &[&[u8]], out: &mut [u8], first_word: usize) {
    let mut ws = vec![0u64; inputs.len()];
    for (k, o) in out.chunks_exact_mut(8).enumerate() {
        let w = first_word + k;
        for (x, a) in ws.iter_mut().zip(inputs) {
            *x = word(a, w);
        }
        o.copy_from_slice(&combine_word(op, &ws).to_le_bytes());
    }
}

/// Combines masks of `numel` bits into a new packed mask of [`padded_len`] bytes.
pub fn combine(op: Op, inputs: &[&[u8]], numel: usize) -> Result<Vec<u8>> {
    match (op, inputs.len()) {
        (_, 0) => return Err(Error::InvalidArgument("no mask to combine".into())),
        (Op::Not, n) if n != 1 => {
            return Err(Error::InvalidArgument("not takes exactly one mask".into()))
        }
        _ => {}
    }
    for (i, a) in inputs.iter().enumerate() {
        check_len(a, numel, &format!("mask {}", i + 1))?;
    }
    let mut out = vec![0u8; padded_len(numel)];
    let full = numel / 64;
    out[..full * 8]
        .par_chunks_mut(PAR_WORDS * 8)
        .enumerate()
        .for_each(|(i, chunk)| dispatch!(combine_words(op, inputs, chunk, i * PAR_WORDS)));
    if !numel.is_multiple_of(64) {
        let ws: Vec<u64> = inputs.iter().map(|a| tail_word(a, full, numel)).collect();
        let used = numel - full * 64;
        let w = combine_word(op, &ws) & ((1u64 << used) - 1);
        out[full * 8..].copy_from_slice(&w.to_le_bytes());
    }
    Ok(out)
}

fn check_lengths(what: &str, tensors: usize, numels: &[usize]) -> Result<()> {
    if tensors != numels.len() {
        return Err(Error::InvalidArgument(format!(
            "{what}: {tensors} tensors but {} numels",
            numels.len()
        )));
    }
    Ok(())
}

/// [`count`] of every tensor of a mask (`masks[t]` holds `numels[t]` bits), tensors in
/// parallel.
pub fn count_each(masks: &[&[u8]], numels: &[usize]) -> Result<Vec<u64>> {
    check_lengths("count", masks.len(), numels)?;
    masks
        .par_iter()
        .zip(numels)
        .map(|(m, &n)| count(m, n))
        .collect()
}

/// [`overlap`] of every tensor of two masks, tensors in parallel.
pub fn overlap_each(a: &[&[u8]], b: &[&[u8]], numels: &[usize]) -> Result<Vec<[u64; 3]>> {
    check_lengths("overlap (first mask)", a.len(), numels)?;
    check_lengths("overlap (second mask)", b.len(), numels)?;
    a.par_iter()
        .zip(b)
        .zip(numels)
        .map(|((x, y), &n)| overlap(x, y, n))
        .collect()
}

/// [`combine`] for every tensor: `inputs[t]` holds tensor `t` of each mask. Tensors in parallel.
pub fn combine_each(op: Op, inputs: &[Vec<&[u8]>], numels: &[usize]) -> Result<Vec<Vec<u8>>> {
    check_lengths("combine", inputs.len(), numels)?;
    inputs
        .par_iter()
        .zip(numels)
        .map(|(ins, &n)| combine(op, ins, n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reference: one bool per element.
    fn unpack(b: &[u8], numel: usize) -> Vec<bool> {
        (0..numel).map(|i| b[i >> 3] >> (i & 7) & 1 == 1).collect()
    }

    fn lcg(seed: &mut u64) -> u64 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *seed >> 11
    }

    fn random(numel: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        // Garbage in the padding: it must be ignored.
        (0..padded_len(numel)).map(|_| lcg(&mut s) as u8).collect()
    }

    #[test]
    fn counts_and_combines_match_bool_reference() {
        for numel in [0usize, 1, 7, 8, 63, 64, 65, 1000, 3 * 64 * PAR_WORDS + 5] {
            let ins: Vec<Vec<u8>> = (0..5).map(|k| random(numel, k as u64 + 1)).collect();
            let bools: Vec<Vec<bool>> = ins.iter().map(|b| unpack(b, numel)).collect();
            let refs: Vec<&[u8]> = ins.iter().map(Vec::as_slice).collect();
            assert_eq!(
                count(refs[0], numel).unwrap(),
                bools[0].iter().filter(|&&x| x).count() as u64
            );
            let [ca, cb, cab] = overlap(refs[0], refs[1], numel).unwrap();
            assert_eq!(ca, bools[0].iter().filter(|&&x| x).count() as u64);
            assert_eq!(cb, bools[1].iter().filter(|&&x| x).count() as u64);
            let both = (0..numel).filter(|&i| bools[0][i] && bools[1][i]).count();
            assert_eq!(cab, both as u64);
            for (op, n) in [
                (Op::And, 3),
                (Op::Or, 4),
                (Op::Xor, 3),
                (Op::Minus, 3),
                (Op::Not, 1),
                (Op::AtLeast(1), 5),
                (Op::AtLeast(3), 5),
                (Op::AtLeast(5), 5),
                (Op::AtLeast(6), 5),
                (Op::AtLeast(2), 2),
            ] {
                let out = combine(op, &refs[..n], numel).unwrap();
                assert_eq!(out.len(), padded_len(numel));
                let want: Vec<bool> = (0..numel)
                    .map(|i| {
                        let v: Vec<bool> = bools[..n].iter().map(|b| b[i]).collect();
                        let k = v.iter().filter(|&&x| x).count();
                        match op {
                            Op::And => k == n,
                            Op::Or => k > 0,
                            Op::Xor => k % 2 == 1,
                            Op::Minus => v[0] && k == 1,
                            Op::Not => !v[0],
                            Op::AtLeast(j) => k >= j,
                        }
                    })
                    .collect();
                assert_eq!(unpack(&out, numel), want, "{op:?} numel={numel}");
                // Padding bits are zero.
                assert_eq!(
                    count(&out, out.len() * 8).unwrap(),
                    count(&out, numel).unwrap()
                );
            }
        }
    }

    #[test]
    fn short_inputs_are_errors() {
        assert!(count(&[0u8; 1], 9).is_err());
        assert!(combine(Op::Not, &[&[0u8; 8], &[0u8; 8]], 8).is_err());
        // Unpadded input (numel / 8 bytes, as numpy.packbits writes) is accepted.
        assert_eq!(count(&[0xff, 0x01], 9).unwrap(), 9);
    }

    #[test]
    fn operations_and_min_count_are_checked_in_one_place() {
        assert_eq!(Op::parse("and", None, 2).unwrap(), Op::And);
        assert_eq!(Op::parse("not", None, 1).unwrap(), Op::Not);
        assert_eq!(Op::parse("consensus", Some(2), 3).unwrap(), Op::AtLeast(2));
        assert_eq!(Op::parse("consensus", Some(1), 1).unwrap(), Op::AtLeast(1));
        let err = |name, j, n| Op::parse(name, j, n).unwrap_err().to_string();
        assert!(err("nand", None, 2).contains("unknown operation 'nand'"));
        assert!(err("consensus", None, 2).contains("needs min_count"));
        assert!(err("consensus", Some(0), 2).contains("between 1 and 2, not 0"));
        assert!(err("consensus", Some(3), 2).contains("between 1 and 2, not 3"));
        assert!(err("or", Some(1), 2).contains("consensus only"));
        assert!(err("not", None, 2).contains("exactly one"));
        assert!(err("minus", None, 1).contains("at least two"));
        assert!(err("and", None, 0).contains("at least one"));
    }

    #[test]
    fn batched_calls_match_one_tensor_at_a_time() {
        let numels = [0usize, 9, 64, 1000];
        let a: Vec<Vec<u8>> = numels.iter().map(|&n| random(n, n as u64 + 3)).collect();
        let b: Vec<Vec<u8>> = numels.iter().map(|&n| random(n, n as u64 + 7)).collect();
        let ra: Vec<&[u8]> = a.iter().map(Vec::as_slice).collect();
        let rb: Vec<&[u8]> = b.iter().map(Vec::as_slice).collect();
        let counts = count_each(&ra, &numels).unwrap();
        let overlaps = overlap_each(&ra, &rb, &numels).unwrap();
        let pairs: Vec<Vec<&[u8]>> = ra.iter().zip(&rb).map(|(x, y)| vec![*x, *y]).collect();
        let ors = combine_each(Op::Or, &pairs, &numels).unwrap();
        for (t, &n) in numels.iter().enumerate() {
            assert_eq!(counts[t], count(ra[t], n).unwrap());
            assert_eq!(overlaps[t], overlap(ra[t], rb[t], n).unwrap());
            assert_eq!(ors[t], combine(Op::Or, &[ra[t], rb[t]], n).unwrap());
        }
        assert!(count_each(&ra, &numels[..3]).is_err());
        assert!(overlap_each(&ra, &rb[..3], &numels).is_err());
        // A short tensor anywhere is an error, not a partial answer.
        let short: Vec<&[u8]> = vec![&[], &[], &[], &[]];
        assert!(count_each(&short, &numels).is_err());
    }
}

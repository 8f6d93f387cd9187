//! Fingerprints of a tensor's bytes (design §9). What a patch writes: a tree of XXH3-128, each
//! [`LEAF`] (64 KiB) of the tensor's bytes hashed alone (the last leaf may be short), then the
//! leaves' digests (16 bytes each, big-endian, as xxHash's canonical form) and the byte length
//! (u64, little-endian) hashed together; 32 hex digits. Leaves are hashed while a pass holds them
//! in the cache, in any order and on any core, and merged when the tensor is done.
//! Patches of version 1 carry BLAKE3 (64 hex digits): they are still checked, by the scheme
//! their fingerprints are written in.
//!
//! Why a non-cryptographic hash suffices: the fingerprints guard against accidents (a patch
//! applied to the wrong base, patches out of order, a damaged file or a faulty apply), where a
//! wrong match needs two different byte strings to collide on 128 bits, probability about
//! 2^-128 per comparison. They do not guard against an adversary, and need not: a patch's
//! author decides the result anyway, and whoever can rewrite the base can rewrite the patch.
//! In the cache XXH3-128 runs about six times as fast as BLAKE3 on one core
//! (`bench/bench_hash.py`).

use rayon::prelude::*;
use twox_hash::XxHash3_128;

/// Bytes per leaf of the tree: the pieces of every pass (2^20 elements when creating, 4 MiB
/// when applying) are whole leaves at offsets that are multiples of it, and a leaf of each
/// side stays in the core's cache between being compared and being hashed.
pub const LEAF: usize = 64 << 10;

/// How a fingerprint was made, read from how it is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// BLAKE3 of the bytes, 64 hex digits (patches of version 1).
    Blake3,
    /// The XXH3-128 tree of this module, 32 hex digits.
    Tree,
}

impl Scheme {
    /// The scheme a fingerprint is written in, or `None` when it is not one.
    pub fn of(print: &str) -> Option<Scheme> {
        let hex = print
            .bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c));
        match (hex, print.len()) {
            (true, 64) => Some(Scheme::Blake3),
            (true, 32) => Some(Scheme::Tree),
            _ => None,
        }
    }
}

/// The digest of one leaf.
pub type Leaf = u128;

/// Hashes one leaf.
pub(super) fn leaf(bytes: &[u8]) -> Leaf {
    XxHash3_128::oneshot(bytes)
}

/// The fingerprint of a tensor of `len` bytes from its leaves' digests in order.
pub(super) fn root(leaves: &[Leaf], len: u64) -> String {
    let mut buf = Vec::with_capacity(16 * leaves.len() + 8);
    for leaf in leaves {
        buf.extend_from_slice(&leaf.to_be_bytes());
    }
    buf.extend_from_slice(&len.to_le_bytes());
    format!("{:032x}", XxHash3_128::oneshot(&buf))
}

/// The fingerprint a patch writes for `bytes`, its leaves hashed on every core.
pub fn fingerprint(bytes: &[u8]) -> String {
    let leaves: Vec<Leaf> = bytes.par_chunks(LEAF).map(XxHash3_128::oneshot).collect();
    root(&leaves, bytes.len() as u64)
}

/// Whether `bytes` have the fingerprint `print`, in the scheme `print` is written in (false for
/// what is not a fingerprint).
pub fn matches(bytes: &[u8], print: &str) -> bool {
    match Scheme::of(print) {
        Some(Scheme::Tree) => fingerprint(bytes) == print,
        Some(Scheme::Blake3) => {
            let mut h = blake3::Hasher::new();
            h.update_rayon(bytes).finalize().to_hex().as_str() == print
        }
        None => false,
    }
}

/// A fingerprint hashed as a tensor streams past in pieces, every piece but the last a
/// multiple of [`LEAF`] long, in the scheme of the fingerprint it will be compared with.
pub(super) struct Streaming {
    blake3: Option<Box<blake3::Hasher>>,
    leaves: Vec<Leaf>,
    len: u64,
}

impl Streaming {
    /// A hasher in the scheme of `like`.
    pub(super) fn like(like: &str) -> Streaming {
        Streaming {
            blake3: (Scheme::of(like) == Some(Scheme::Blake3)).then(Default::default),
            leaves: Vec::new(),
            len: 0,
        }
    }

    pub(super) fn update(&mut self, piece: &[u8]) {
        debug_assert!(
            self.len.is_multiple_of(LEAF as u64),
            "pieces are whole leaves"
        );
        match &mut self.blake3 {
            Some(h) => {
                h.update(piece);
            }
            None => self.leaves.extend(piece.chunks(LEAF).map(leaf)),
        }
        self.len += piece.len() as u64;
    }

    /// Whether what streamed past has the fingerprint `print`.
    pub(super) fn matches(&self, print: &str) -> bool {
        match &self.blake3 {
            Some(h) => h.finalize().to_hex().as_str() == print,
            None => root(&self.leaves, self.len) == print,
        }
    }
}

/// XXH3-128 of a whole [`LEAF`] kept in AVX2 registers a 64-byte stripe at a time, so that a
/// pass that already holds a stripe in registers (the create pass's compare) hashes it there:
/// the hash's arithmetic then overlaps the memory reads the compare waits for, where hashing
/// the leaf after comparing it ran the two one after the other. The digest equals
/// [`leaf`]'s (xxHash's long-input algorithm with the default secret and seed 0; tested against
/// `twox-hash`). Only for leaves of exactly [`LEAF`] bytes: their stripes fall into 64 rounds of
/// 16, the last round's last stripe keyed by xxHash's "last stripe" part of the secret.
#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use super::{Leaf, LEAF};
    use std::arch::x86_64::*;

    /// xxHash's default secret (`kSecret`).
    const SECRET: [u8; 192] = [
        0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad,
        0x1c, 0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3,
        0x67, 0x1f, 0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc,
        0xff, 0x72, 0x21, 0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6,
        0x81, 0x3a, 0x26, 0x4c, 0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65,
        0x8b, 0x1b, 0x53, 0x2e, 0xa3, 0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19,
        0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8, 0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9,
        0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d, 0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31,
        0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64, 0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb,
        0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb, 0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0,
        0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e, 0x2b, 0x16, 0xbe, 0x58, 0x7d,
        0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce, 0x45, 0xcb, 0x3a, 0x8f,
        0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
    ];
    const PRIME32_1: u64 = 0x9E37_79B1;
    const PRIME32_2: u64 = 0x85EB_CA77;
    const PRIME32_3: u64 = 0xC2B2_AE3D;
    const PRIME64_1: u64 = 0x9E37_79B1_85EB_CA87;
    const PRIME64_2: u64 = 0xC2B2_AE3D_27D4_EB4F;
    const PRIME64_3: u64 = 0x1656_67B1_9E37_79F9;
    const PRIME64_4: u64 = 0x85EB_CA77_C2B2_AE63;
    const PRIME64_5: u64 = 0x27D4_EB2F_1656_67C5;

    /// Stripes of 64 bytes per round (between two scrambles): (secret length - 64) / 8.
    pub const ROUND: usize = 16;
    /// Rounds per leaf.
    pub const ROUNDS: usize = LEAF / 64 / ROUND;

    /// The eight 64-bit accumulators, four to a register.
    #[derive(Clone, Copy)]
    pub struct Acc([__m256i; 2]);

    /// 32 bytes of the secret from `at` (at most 160).
    #[target_feature(enable = "avx2")]
    #[inline]
    fn key(at: usize) -> __m256i {
        let key = &SECRET[at..at + 32];
        // SAFETY: `key` is 32 readable bytes (the slice above is bounds-checked); the load
        // is unaligned.
        unsafe { _mm256_loadu_si256(key.as_ptr().cast()) }
    }

    impl Acc {
        #[target_feature(enable = "avx2")]
        #[inline]
        pub fn new() -> Acc {
            let p = [
                PRIME32_3, PRIME64_1, PRIME64_2, PRIME64_3, PRIME64_4, PRIME32_2, PRIME64_5,
                PRIME32_1,
            ]
            .map(|p| p as i64);
            Acc([
                _mm256_setr_epi64x(p[0], p[1], p[2], p[3]),
                _mm256_setr_epi64x(p[4], p[5], p[6], p[7]),
            ])
        }

        /// Takes in stripe `s` of round `r` (`s < ROUND`, `r < ROUNDS`), its two halves.
        #[target_feature(enable = "avx2")]
        #[inline]
        pub fn stripe(&mut self, r: usize, s: usize, data: [__m256i; 2]) {
            // The leaf's last stripe is keyed 7 bytes before the secret's last 64.
            let at = if r == ROUNDS - 1 && s == ROUND - 1 {
                SECRET.len() - 64 - 7
            } else {
                8 * s
            };
            for (h, (acc, d)) in self.0.iter_mut().zip(data).enumerate() {
                let dk = _mm256_xor_si256(d, key(at + 32 * h));
                let product = _mm256_mul_epu32(dk, _mm256_srli_epi64::<32>(dk));
                // Each 64-bit word added to its neighbour's accumulator (lanes i and i ^ 1).
                let swapped = _mm256_shuffle_epi32::<0b01_00_11_10>(d);
                *acc = _mm256_add_epi64(product, _mm256_add_epi64(*acc, swapped));
            }
        }

        /// Ends round `r`: every round but the leaf's last scrambles the accumulators.
        #[target_feature(enable = "avx2")]
        #[inline]
        pub fn end_round(&mut self, r: usize) {
            if r == ROUNDS - 1 {
                return;
            }
            let prime = _mm256_set1_epi64x(PRIME32_1 as i64);
            for (h, acc) in self.0.iter_mut().enumerate() {
                let a = _mm256_xor_si256(*acc, _mm256_srli_epi64::<47>(*acc));
                let dk = _mm256_xor_si256(a, key(SECRET.len() - 64 + 32 * h));
                let lo = _mm256_mul_epu32(dk, prime);
                let hi = _mm256_mul_epu32(_mm256_srli_epi64::<32>(dk), prime);
                *acc = _mm256_add_epi64(lo, _mm256_slli_epi64::<32>(hi));
            }
        }

        /// The leaf's digest, as [`super::leaf`] gives it.
        #[target_feature(enable = "avx2")]
        #[inline]
        pub fn finish(self) -> Leaf {
            let mut acc = [0u64; 8];
            for (h, v) in self.0.iter().enumerate() {
                // SAFETY: `acc[4 * h..]` holds four u64, 32 writable bytes; the store is
                // unaligned.
                unsafe { _mm256_storeu_si256(acc[4 * h..].as_mut_ptr().cast(), *v) };
            }
            let len = LEAF as u64;
            let low = merge(&acc, len.wrapping_mul(PRIME64_1), 11);
            let high = merge(&acc, !len.wrapping_mul(PRIME64_2), SECRET.len() - 64 - 11);
            (u128::from(high) << 64) | u128::from(low)
        }
    }

    /// xxHash's final merge of the accumulators with the secret from `at`.
    fn merge(acc: &[u64; 8], init: u64, at: usize) -> u64 {
        let word = |k: usize| {
            let b = &SECRET[at + 8 * k..at + 8 * k + 8];
            u64::from_le_bytes(b.try_into().expect("8 bytes"))
        };
        let mut h = init;
        for i in 0..4 {
            let m =
                u128::from(acc[2 * i] ^ word(2 * i)) * u128::from(acc[2 * i + 1] ^ word(2 * i + 1));
            h = h.wrapping_add(m as u64 ^ (m >> 64) as u64);
        }
        h ^= h >> 37;
        h = h.wrapping_mul(0x1656_6791_9E37_79F9);
        h ^ (h >> 32)
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::avx2::{Acc, ROUND, ROUNDS};
    use super::{leaf, LEAF};
    use std::arch::x86_64::{__m256i, _mm256_loadu_si256};

    /// The AVX2 stripes of a whole leaf give `twox-hash`'s XXH3-128 of it, for random bytes,
    /// all zeros and all ones (on a CPU without AVX2 there is nothing to check: the pass
    /// hashes with `twox-hash` there).
    #[test]
    fn stripes_of_a_leaf_hash_as_xxh3() {
        #[target_feature(enable = "avx2")]
        fn hashed(bytes: &[u8]) -> u128 {
            let mut acc = Acc::new();
            for r in 0..ROUNDS {
                for s in 0..ROUND {
                    let at = 64 * (ROUND * r + s);
                    // SAFETY: 32-byte unaligned loads inside `bytes` (a leaf: `at + 64 <=
                    // LEAF`).
                    let half = |o: usize| -> __m256i {
                        unsafe { _mm256_loadu_si256(bytes[at + o..at + o + 32].as_ptr().cast()) }
                    };
                    acc.stripe(r, s, [half(0), half(32)]);
                }
                acc.end_round(r);
            }
            acc.finish()
        }
        if !std::is_x86_feature_detected!("avx2") {
            return;
        }
        let random = crate::testing::random_bytes(0x2545_F491_4F6C_DD1Du64, LEAF);
        for bytes in [random, vec![0u8; LEAF], vec![0xFFu8; LEAF]] {
            // SAFETY: the CPU has AVX2 (checked above).
            assert_eq!(unsafe { hashed(&bytes) }, leaf(&bytes));
        }
    }
}

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

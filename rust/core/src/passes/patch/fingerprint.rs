//! Fingerprints: BLAKE3 of a tensor's bytes, hashed in pieces as a pass reads them and
//! merged into the hash of the whole.

use super::*;

/// blake3 of `bytes`, hex, hashed on every core: a tensor's fingerprint in a patch.
pub fn fingerprint(bytes: &[u8]) -> String {
    let mut h = blake3::Hasher::new();
    h.update_rayon(bytes);
    h.finalize().to_hex().to_string()
}

/// The hash of one piece of a tensor's bytes, for [`merged_fingerprint`]: pieces are the
/// pass's chunks of [`CHUNK`] elements, `offset` bytes into the tensor. A piece of
/// `CHUNK * size` bytes (every dtype's size is 1, 2, 4 or 8) is a power of two of BLAKE3's
/// 1 KiB chunks at an offset that is a multiple of its length, so it is a whole subtree of the
/// tensor's hash tree (the last piece may be short: it lies on the tree's right edge). A
/// tensor of one piece is its own root.
///
/// Hashed on every core: a tensor of one piece is compared by one worker alone, and its hash
/// would be too.
pub(super) fn piece_print(bytes: &[u8], offset: u64, only: bool) -> ChainingValue {
    let mut h = blake3::Hasher::new();
    if only {
        return *h.update_rayon(bytes).finalize().as_bytes();
    }
    h.set_input_offset(offset)
        .update_rayon(bytes)
        .finalize_non_root()
}

/// The fingerprint (as [`fingerprint`] gives it) of a tensor from its pieces' hashes in
/// order, without reading its bytes again.
pub(super) fn merged_fingerprint(pieces: &[ChainingValue]) -> String {
    // A tree of n pieces (all of one power-of-two size but the last) puts the largest power
    // of two of pieces below n in its left subtree (BLAKE3 paper, §2.1).
    fn halves(pieces: &[ChainingValue]) -> (ChainingValue, ChainingValue) {
        let left = pieces.len().next_power_of_two() / 2;
        (subtree(&pieces[..left]), subtree(&pieces[left..]))
    }
    fn subtree(pieces: &[ChainingValue]) -> ChainingValue {
        if let [one] = pieces {
            return *one;
        }
        let (l, r) = halves(pieces);
        merge_subtrees_non_root(&l, &r, Mode::Hash)
    }
    match pieces {
        [] => blake3::hash(&[]).to_hex().to_string(),
        [only] => blake3::Hash::from_bytes(*only).to_hex().to_string(),
        _ => {
            let (l, r) = halves(pieces);
            merge_subtrees_root(&l, &r, Mode::Hash).to_hex().to_string()
        }
    }
}

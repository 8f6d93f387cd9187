//! Sparse patches (design §9): a safetensors file that turns checkpoint B into checkpoint C
//! exactly. Per changed tensor, `NAME.indices` (I32 flat ascending, I64 past 2^31 elements) and
//! `NAME.values` (C's values at those indices, in the tensor's own dtype), or `NAME.dense` (C's
//! whole tensor) where that is smaller; `__metadata__` holds `format=rlmask-patch`, `version`,
//! and `tensors`: every tensor of B with its shape, dtype, changed count, form and the blake3
//! fingerprints of its bytes in B and in C. With `codec=compact` a sparse tensor is stored as
//! `NAME.frames` (int64 rows: first element, changes, bytes) and `NAME.compact` (the frames of
//! [`crate::codec`], one after another) instead of indices and values.
//!
//! Creating is one streaming pass over both checkpoints (changed positions found eight bytes
//! at a time, spilled to temporary files in order, so memory stays flat), then the patch file
//! is assembled. Applying streams B's shards into new files a piece at a time, with each
//! patch's entries written over each piece in order, checking B's fingerprint before and C's
//! after; patches chain by fingerprint, so a missing, repeated or reordered patch is refused
//! before anything is written.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufWriter, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use blake3::hazmat::{
    merge_subtrees_non_root, merge_subtrees_root, ChainingValue, HasherExt, Mode,
};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::checkpoint::Checkpoint;
use crate::codec::Frame;
use crate::diff::{Progress, Side};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::readahead;
use crate::safetensors::{check_all_unchanged, check_header_len, Shard, TensorInfo};

/// The `format` of a patch file.
pub const FORMAT: &str = "rlmask-patch";
/// The version written and read.
pub const VERSION: &str = "1";

/// Elements compared per unit of parallel work.
const CHUNK: usize = 1 << 20;
/// Bytes streamed per piece when applying.
const PIECE: usize = 4 << 20;

/// How the changes of sparse tensors are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// `NAME.indices` and `NAME.values`, as trainers and inference engines exchange them.
    Plain,
    /// `NAME.frames` and `NAME.compact`: gaps and byte planes under zstd ([`crate::codec`]).
    Compact,
}

impl Codec {
    /// The codecs by name, as the CLI and the `codec` metadata spell them.
    pub const NAMES: [&'static str; 2] = ["plain", "compact"];
    /// What a patch is written in unless a codec is chosen: compact, 2.1 to 3.1 times smaller
    /// than plain at 1-20% changed (bench/RESULTS.md); plain is one option away for engines
    /// that load it as it is.
    pub const DEFAULT: Codec = Codec::Compact;

    pub fn parse(name: &str) -> Result<Codec> {
        match name {
            "plain" => Ok(Codec::Plain),
            "compact" => Ok(Codec::Compact),
            _ => Err(Error::InvalidArgument(format!(
                "unknown patch codec '{name}' (plain or compact)"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Codec::Plain => "plain",
            Codec::Compact => "compact",
        }
    }
}

/// How a tensor is stored in a patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Form {
    /// Unchanged: nothing stored.
    None,
    /// `NAME.indices` and `NAME.values`.
    Sparse,
    /// `NAME.frames` and `NAME.compact` ([`crate::codec`]).
    Compact,
    /// `NAME.dense`: the whole tensor of C.
    Dense,
}

/// What a patch records about one tensor of B.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    pub shape: Vec<u64>,
    pub dtype: String,
    /// Elements whose bits differ between B and C.
    pub changed: u64,
    pub form: Form,
    /// blake3 of the tensor's raw bytes in B and in C, hex.
    pub base: String,
    pub tuned: String,
}

impl Entry {
    fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// An opened, validated patch file.
pub struct Patch {
    pub path: PathBuf,
    shard: Shard,
    /// Every tensor of B, by name.
    pub entries: BTreeMap<String, Entry>,
    pub metadata: BTreeMap<String, String>,
    pub codec: Codec,
    /// The frames of each compact sparse tensor, validated against its entry.
    frames: BTreeMap<String, Vec<Frame>>,
}

fn corrupt(path: &Path, tensor: Option<&str>, reason: impl Into<String>) -> Error {
    match tensor {
        Some(t) => Error::tensor(path, t, reason.into()),
        None => Error::Header {
            path: path.to_path_buf(),
            reason: reason.into(),
        },
    }
}

impl Patch {
    /// Opens and validates a patch: format, version, the `tensors` description against the
    /// stored tensors (names, dtypes, counts). Indices are checked as they are applied.
    pub fn open(path: &Path) -> Result<Patch> {
        let shard = Shard::open(path)?;
        let meta = &shard.metadata;
        if meta.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(corrupt(
                path,
                None,
                format!(
                    "not an rlmask patch (format {:?}, expected \"{FORMAT}\")",
                    meta.get("format")
                ),
            ));
        }
        if meta.get("version").map(String::as_str) != Some(VERSION) {
            return Err(corrupt(
                path,
                None,
                format!("patch version {:?} is not {VERSION}", meta.get("version")),
            ));
        }
        let text = meta
            .get("tensors")
            .ok_or_else(|| corrupt(path, None, "the patch has no 'tensors' description"))?;
        let entries: BTreeMap<String, Entry> = serde_json::from_str(text)
            .map_err(|e| corrupt(path, None, format!("its 'tensors' description: {e}")))?;
        let codec = match meta.get("codec") {
            None => Codec::Plain,
            Some(c) => {
                Codec::parse(c).map_err(|_| corrupt(path, None, format!("unknown codec {c:?}")))?
            }
        };
        let stored: BTreeMap<&str, &TensorInfo> =
            shard.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
        let mut described = BTreeSet::new();
        for (name, e) in &entries {
            let dtype = Dtype::parse(&e.dtype)
                .filter(|&d| d != Dtype::F4)
                .ok_or_else(|| corrupt(path, Some(name), format!("unknown dtype {}", e.dtype)))?;
            let bytes = e
                .shape
                .iter()
                .try_fold(dtype.size().max(1) as u64, |n, &d| n.checked_mul(d));
            if bytes.is_none_or(|b| b > i64::MAX as u64) {
                return Err(corrupt(
                    path,
                    Some(name),
                    format!("shape {:?} is larger than any tensor can be", e.shape),
                ));
            }
            // Stored key, its dtype (None: either index width) and shape (None: any).
            type Want = (String, Option<Dtype>, Option<Vec<u64>>);
            let want: Vec<Want> = match e.form {
                Form::None => vec![],
                Form::Dense => {
                    vec![(format!("{name}.dense"), Some(dtype), Some(e.shape.clone()))]
                }
                Form::Sparse => vec![
                    (format!("{name}.indices"), None, Some(vec![e.changed])),
                    (format!("{name}.values"), Some(dtype), Some(vec![e.changed])),
                ],
                Form::Compact => vec![
                    (format!("{name}.frames"), Some(Dtype::I64), None),
                    (format!("{name}.compact"), Some(Dtype::U8), None),
                ],
            };
            if (e.form == Form::None) != (e.changed == 0) || e.changed > e.numel() {
                return Err(corrupt(
                    path,
                    Some(name),
                    format!(
                        "{} changed elements do not fit its form and shape",
                        e.changed
                    ),
                ));
            }
            for (key, dt, shape) in want {
                let t = stored.get(key.as_str()).ok_or_else(|| {
                    corrupt(
                        path,
                        Some(name),
                        format!("'{key}' is described but not stored"),
                    )
                })?;
                let dt_ok = match dt {
                    Some(d) => t.dtype == d,
                    None => matches!(t.dtype, Dtype::I32 | Dtype::I64),
                };
                if !dt_ok || shape.is_some_and(|s| t.shape != s) {
                    return Err(corrupt(
                        path,
                        Some(name),
                        format!(
                            "'{key}' is stored as {} {:?}, not as described",
                            t.dtype, t.shape
                        ),
                    ));
                }
                described.insert(key);
            }
        }
        if let Some(t) = shard.tensors.iter().find(|t| !described.contains(&t.name)) {
            return Err(corrupt(
                path,
                Some(&t.name),
                "stored in the patch but not described",
            ));
        }
        let mut frames = BTreeMap::new();
        for (name, e) in entries.iter().filter(|(_, e)| e.form == Form::Compact) {
            frames.insert(name.clone(), read_frames(path, &shard, name, e)?);
        }
        let metadata = shard.metadata.clone();
        Ok(Patch {
            path: path.to_path_buf(),
            shard,
            entries,
            metadata,
            codec,
            frames,
        })
    }

    fn stored(&self, key: &str) -> Option<(&TensorInfo, &[u8])> {
        let t = self.shard.tensors.iter().find(|t| t.name == key)?;
        Some((t, self.shard.bytes(t)))
    }

    /// Bytes stored, by kind: `indices`, `values` (plain sparse), `compact` (frames and
    /// their table), `dense`.
    pub fn bytes(&self) -> BTreeMap<&'static str, u64> {
        let mut out: BTreeMap<&'static str, u64> = ["indices", "values", "compact", "dense"]
            .into_iter()
            .map(|k| (k, 0))
            .collect();
        for t in &self.shard.tensors {
            let kind = match t.name.rsplit('.').next() {
                Some("indices") => "indices",
                Some("values") => "values",
                Some("frames" | "compact") => "compact",
                _ => "dense",
            };
            *out.get_mut(kind).expect("listed") += t.len as u64;
        }
        out
    }

    /// The bytes these changes take in the plain codec (indices and values, dense tensors
    /// whole), whichever codec the patch uses: what a trainer syncing them would send.
    pub fn plain_bytes(&self) -> u64 {
        self.entries
            .values()
            .map(|e| {
                let size = Dtype::parse(&e.dtype).map_or(1, |d| d.size()) as u64;
                match e.form {
                    Form::None => 0,
                    Form::Dense => e.numel() * size,
                    Form::Sparse | Form::Compact => {
                        e.changed * (index_width(e.numel()) as u64 + size)
                    }
                }
            })
            .sum()
    }

    /// Every change stored for tensor `name`, decoded and checked: (flat indices, values'
    /// raw bytes); for a tensor stored whole, no indices and its bytes; None for a tensor it
    /// does not change.
    #[allow(clippy::type_complexity)]
    pub fn changes(&self, name: &str) -> Result<Option<(Option<Vec<u64>>, Vec<u8>)>> {
        let e = self
            .entries
            .get(name)
            .ok_or_else(|| corrupt(&self.path, Some(name), "not a tensor of this patch"))?;
        match e.form {
            Form::None => Ok(None),
            Form::Dense => {
                let (_, bytes) = self.stored(&format!("{name}.dense")).expect("validated");
                Ok(Some((None, bytes.to_vec())))
            }
            Form::Sparse | Form::Compact => {
                let mut walk = Changes::new(self, name, e);
                let (mut idx, mut vals) = (Vec::new(), Vec::new());
                while walk.refill()? {
                    idx.extend_from_slice(&walk.idx);
                    vals.extend_from_slice(&walk.vals);
                }
                walk.finish()?;
                Ok(Some((Some(idx), vals)))
            }
        }
    }
}

/// Changes up to which a tensor whose compact frames are larger than plain indices and values
/// is stored plain (its frames are decoded in memory to be rewritten); above it, the two
/// differ by the frames' few bytes of overhead and it stays compact.
const REPACK: u64 = 1 << 20;

/// The form a changed tensor takes and its bytes: the smallest its codec allows. `compact`:
/// the bytes of its compact frames with their table (None in the plain codec).
pub fn choose_form(changed: u64, numel: u64, size: u64, compact: Option<u64>) -> (Form, u64) {
    if changed == 0 {
        return (Form::None, 0);
    }
    let plain = changed * (index_width(numel) as u64 + size);
    let mut best = (Form::Dense, numel * size);
    if plain < best.1 && (compact.is_none() || changed <= REPACK) {
        best = (Form::Sparse, plain);
    }
    if let Some(c) = compact.filter(|&c| c < best.1) {
        best = (Form::Compact, c);
    }
    best
}

/// Bytes the compact codec stores for the changes `indices` (ascending flat indices) with
/// `values` (`size` bytes each) of a tensor of `numel` elements: frames cut as [`create`]
/// cuts them with their table, or plain indices and values, or the whole tensor, whichever
/// [`choose_form`] picks.
pub fn compact_bytes(indices: &[u64], values: &[u8], size: usize, numel: u64) -> Result<u64> {
    if indices.windows(2).any(|w| w[0] >= w[1]) || indices.last().is_some_and(|&i| i >= numel) {
        return Err(Error::InvalidArgument(format!(
            "indices must ascend without repeats and stay below {numel}"
        )));
    }
    let mut groups = Vec::new();
    let mut from = 0;
    while from < indices.len() {
        let chunk = indices[from] / CHUNK as u64;
        let to = from + indices[from..].partition_point(|&i| i / CHUNK as u64 == chunk);
        groups.push((chunk * CHUNK as u64, from, to));
        from = to;
    }
    let bytes: usize = groups
        .par_iter()
        .map(|&(start, from, to)| {
            let offsets = indices[from..to].iter().map(|&i| i - start);
            crate::codec::encode(offsets, &values[from * size..to * size], size).len() + 24
        })
        .sum();
    let changed = indices.len() as u64;
    Ok(choose_form(changed, numel, size as u64, Some(bytes as u64)).1)
}

/// Bytes per index for a tensor of `numel` elements: int32, int64 past 2^31 elements.
fn index_width(numel: u64) -> usize {
    if numel > i32::MAX as u64 + 1 {
        8
    } else {
        4
    }
}

/// Reads and checks the frame table of compact tensor `name`: frames in order, each inside
/// the tensor with at least one change, counts summing to the entry's and bytes to the blob's.
fn read_frames(path: &Path, shard: &Shard, name: &str, e: &Entry) -> Result<Vec<Frame>> {
    let find = |key: String| {
        shard
            .tensors
            .iter()
            .find(|t| t.name == key)
            .expect("checked")
    };
    let (table, blob) = (
        find(format!("{name}.frames")),
        find(format!("{name}.compact")),
    );
    let bad = |why: String| corrupt(path, Some(name), format!("corrupt patch: {why}"));
    if table.shape.len() != 2 || table.shape[1] != 3 || blob.shape.len() != 1 {
        return Err(bad(format!(
            "frames stored as {:?} and changes as {:?}",
            table.shape, blob.shape
        )));
    }
    let raw = shard.bytes(table);
    let mut frames = Vec::with_capacity(table.shape[0] as usize);
    let (mut count, mut bytes) = (0u64, 0u64);
    for row in raw.chunks_exact(24) {
        let v: Vec<i64> = row
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect();
        if v.iter().any(|&x| x < 0) {
            return Err(bad(format!("a negative number in frame {:?}", v)));
        }
        let f = Frame {
            start: v[0] as u64,
            count: v[1] as u64,
            bytes: v[2] as u64,
        };
        let after = frames.last().is_none_or(|p: &Frame| f.start > p.start);
        if !after || f.start >= e.numel() || f.count == 0 || f.count > e.numel() - f.start {
            return Err(bad(format!(
                "frame {} (first element {}, {} changes) is out of order or range",
                frames.len(),
                f.start,
                f.count
            )));
        }
        count = count.saturating_add(f.count);
        bytes = bytes.saturating_add(f.bytes);
        frames.push(f);
    }
    if count != e.changed || bytes != blob.len as u64 {
        return Err(bad(format!(
            "frames of {count} changes in {bytes} bytes, where the patch describes {} changes \
             and stores {} bytes",
            e.changed, blob.len
        )));
    }
    Ok(frames)
}

/// Walks the changes a patch stores for one sparse tensor in order, a batch at a time (a
/// frame, or a run of plain indices), checking that the indices ascend and stay in range.
struct Changes<'p> {
    patch: &'p Patch,
    name: &'p str,
    form: Form,
    numel: u64,
    size: usize,
    changed: u64,
    /// Batches handed out so far, changes in them, and compact bytes they took.
    batch: usize,
    seen: u64,
    blob_at: usize,
    /// The current batch.
    idx: Vec<u64>,
    vals: Vec<u8>,
    pos: usize,
}

/// Plain indices decoded per batch.
const BATCH: usize = 1 << 16;

impl<'p> Changes<'p> {
    fn new(patch: &'p Patch, name: &'p str, e: &Entry) -> Changes<'p> {
        let size = Dtype::parse(&e.dtype).map_or(1, |d| d.size()).max(1);
        Changes {
            patch,
            name,
            form: e.form,
            numel: e.numel(),
            size,
            changed: e.changed,
            batch: 0,
            seen: 0,
            blob_at: 0,
            idx: Vec::new(),
            vals: Vec::new(),
            pos: 0,
        }
    }

    fn bad(&self, why: impl std::fmt::Display) -> Error {
        corrupt(
            &self.patch.path,
            Some(self.name),
            format!(
                "corrupt patch: {why} (in a tensor of {} elements)",
                self.numel
            ),
        )
    }

    /// Loads the next batch; false when every change has been handed out.
    fn refill(&mut self) -> Result<bool> {
        let last = self.idx.last().copied();
        self.idx.clear();
        self.vals.clear();
        self.pos = 0;
        if self.seen == self.changed {
            return Ok(false);
        }
        let name = self.name;
        match self.form {
            Form::Sparse => {
                let (it, raw) = self
                    .patch
                    .stored(&format!("{name}.indices"))
                    .expect("validated");
                let (_, vals) = self
                    .patch
                    .stored(&format!("{name}.values"))
                    .expect("validated");
                let iw = it.dtype.size();
                let from = self.seen as usize;
                let to = (from + BATCH).min(self.changed as usize);
                self.idx
                    .extend(raw[from * iw..to * iw].chunks_exact(iw).map(|b| {
                        if iw == 8 {
                            i64::from_le_bytes(b.try_into().expect("8")) as u64
                        } else {
                            u32::from_le_bytes(b.try_into().expect("4")) as u64
                        }
                    }));
                self.vals
                    .extend_from_slice(&vals[from * self.size..to * self.size]);
            }
            _ => {
                let frames = &self.patch.frames[name];
                let (_, blob) = self
                    .patch
                    .stored(&format!("{name}.compact"))
                    .expect("validated");
                let len = frames[self.batch].bytes as usize;
                let frame = &blob[self.blob_at..self.blob_at + len];
                self.blob_at += len;
                crate::codec::decode_nth(
                    frames,
                    self.batch,
                    frame,
                    self.size,
                    self.numel,
                    &mut self.idx,
                    &mut self.vals,
                )
                .map_err(|why| self.bad(format!("frame {}: {why}", self.batch)))?;
            }
        }
        let mut prev = last;
        for &i in &self.idx {
            if i >= self.numel || prev.is_some_and(|p| p >= i) {
                return Err(self.bad(format!("index {i} is out of range or out of order")));
            }
            prev = Some(i);
        }
        self.batch += 1;
        self.seen += self.idx.len() as u64;
        Ok(true)
    }

    /// Writes over `piece` (the tensor's elements `first..end`) every change below `end`.
    fn write_until(&mut self, first: u64, end: u64, piece: &mut [u8]) -> Result<()> {
        let size = self.size;
        loop {
            if self.pos == self.idx.len() && !self.refill()? {
                return Ok(());
            }
            while self.pos < self.idx.len() {
                let i = self.idx[self.pos];
                if i >= end {
                    return Ok(());
                }
                if i < first {
                    return Err(self.bad(format!("index {i} is out of order")));
                }
                let (o, k) = ((i - first) as usize * size, self.pos * size);
                match size {
                    1 => piece[o] = self.vals[k],
                    2 => piece[o..o + 2].copy_from_slice(&self.vals[k..k + 2]),
                    4 => piece[o..o + 4].copy_from_slice(&self.vals[k..k + 4]),
                    _ => piece[o..o + size].copy_from_slice(&self.vals[k..k + size]),
                }
                self.pos += 1;
            }
        }
    }

    /// Checks that every change was handed out.
    fn finish(&self) -> Result<()> {
        if self.seen != self.changed || self.pos != self.idx.len() {
            return Err(self.bad("an index is out of range or out of order"));
        }
        Ok(())
    }
}

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
fn piece_print(bytes: &[u8], offset: u64, only: bool) -> ChainingValue {
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
fn merged_fingerprint(pieces: &[ChainingValue]) -> String {
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

/// Appends the flat indices (`wide`: i64, else i32, little-endian) and `b`'s values of the
/// elements of `size` bytes whose bits differ between `a` and `b`, the first at index `first`.
/// Eight bytes are compared at a time as a word; in a word that differs every lane is written
/// out and kept or overwritten by the next (a branch-free compaction: at RL's densities which
/// lanes changed is unpredictable, and mispredicted branches would cost more than the stores).
fn changed_into(
    a: &[u8],
    b: &[u8],
    size: usize,
    first: u64,
    wide: bool,
    idx: &mut Vec<u8>,
    vals: &mut Vec<u8>,
) {
    let n = a.len() / size;
    let iw = if wide { 8 } else { 4 };
    let (i0, v0) = (idx.len(), vals.len());
    let lanes = 8 / size;
    let bits = 8 * size as u32;
    let lane_mask = if size == 8 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    // The buffers grow a span of words at a time, by the room that span may use (values with 8
    // bytes of slack for the word-wide writes), so only that much is zeroed: zeroing room for
    // every element of the chunk up front was a tenth of a patch's time.
    const SPAN: usize = 1024;
    let room = |idx: &mut Vec<u8>, vals: &mut Vec<u8>, count: usize, more: usize| {
        let (ni, nv) = (i0 + (count + more) * iw, v0 + (count + more) * size + 8);
        if idx.len() < ni {
            idx.resize(ni, 0);
        }
        if vals.len() < nv {
            vals.resize(nv, 0);
        }
    };
    // Writes element `e` at slot `count`; the caller moves past it only if it changed.
    let put = |idx: &mut [u8], vals: &mut [u8], count: usize, e: usize, value: u64| {
        let i = first + e as u64;
        if wide {
            idx[i0 + count * 8..i0 + count * 8 + 8].copy_from_slice(&i.to_le_bytes());
        } else {
            idx[i0 + count * 4..i0 + count * 4 + 4].copy_from_slice(&(i as u32).to_le_bytes());
        }
        vals[v0 + count * size..v0 + count * size + 8].copy_from_slice(&value.to_le_bytes());
    };
    let mut count = 0usize;
    let words = a.len() / 8;
    for from in (0..words).step_by(SPAN) {
        let to = words.min(from + SPAN);
        room(idx, vals, count, (to - from) * lanes);
        for w in from..to {
            let x = u64::from_le_bytes(a[w * 8..w * 8 + 8].try_into().expect("8 bytes"));
            let y = u64::from_le_bytes(b[w * 8..w * 8 + 8].try_into().expect("8 bytes"));
            let d = x ^ y;
            if d != 0 {
                for k in 0..lanes {
                    let shift = bits * k as u32;
                    put(idx, vals, count, w * lanes + k, (y >> shift) & lane_mask);
                    count += usize::from((d >> shift) & lane_mask != 0);
                }
            }
        }
    }
    room(idx, vals, count, n - words * lanes);
    for e in words * lanes..n {
        let (x, y) = (&a[e * size..(e + 1) * size], &b[e * size..(e + 1) * size]);
        let mut v = [0u8; 8];
        v[..size].copy_from_slice(y);
        put(idx, vals, count, e, u64::from_le_bytes(v));
        count += usize::from(x != y);
    }
    idx.truncate(i0 + count * iw);
    vals.truncate(v0 + count * size);
}

/// A temporary file beside the output, removed when dropped.
struct Scratch {
    path: PathBuf,
    file: BufWriter<File>,
    len: u64,
}

impl Scratch {
    fn new(out: &Path, tag: &str) -> Result<Scratch> {
        let path = sibling(out, tag);
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| Error::output(out, e))?;
        Ok(Scratch {
            path,
            file: BufWriter::with_capacity(1 << 20, file),
            len: 0,
        })
    }

    fn write(&mut self, out: &Path, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all(bytes)
            .map_err(|e| Error::output(out, e))?;
        self.len += bytes.len() as u64;
        Ok(())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A hidden name beside `out`, private to this process.
fn sibling(out: &Path, tag: &str) -> PathBuf {
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    dir.join(format!(".{name}.{tag}.{}.tmp", std::process::id()))
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
    /// The hashes of its pieces in base and in tuned, in order (see [`merged_fingerprint`]).
    prints: (Vec<ChainingValue>, Vec<ChainingValue>),
}

impl Span {
    /// Decodes this tensor's compact frames back from the scratch file `scratch`.
    fn decode(
        &self,
        scratch: &Scratch,
        out: &Path,
        size: usize,
        numel: u64,
    ) -> Result<(Vec<u64>, Vec<u8>)> {
        use std::os::unix::fs::FileExt;
        let mut blob = vec![0u8; self.stored as usize];
        scratch
            .file
            .get_ref()
            .read_exact_at(&mut blob, self.val_at)
            .map_err(|e| Error::output(out, e))?;
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

/// One tensor to patch: its name in B and both sides.
struct Job<'a> {
    name: &'a str,
    a: (&'a Shard, &'a TensorInfo),
    b: (&'a Shard, &'a TensorInfo),
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
    let only_a: Vec<&String> = sa.names.keys().filter(|n| !sb.contains(n)).collect();
    let only_b: Vec<&String> = sb.names.keys().filter(|n| !sa.contains(n)).collect();
    if !only_a.is_empty() || !only_b.is_empty() {
        let few = |v: &[&String]| {
            v.iter()
                .take(3)
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("', '")
        };
        return Err(Error::Pairing {
            reason: format!(
                "a patch needs the same tensors on both sides: {} only in base ({}, e.g. '{}'), \
                 {} only in tuned ({}, e.g. '{}')",
                only_a.len(),
                base.path.display(),
                few(&only_a),
                only_b.len(),
                tuned.path.display(),
                few(&only_b)
            ),
        });
    }
    let mut jobs = Vec::new();
    for (paired, stored) in &sa.names {
        let (a, b) = (
            sa.get(paired).expect("present"),
            sb.get(paired).expect("present"),
        );
        if a.1.shape != b.1.shape || a.1.dtype != b.1.dtype {
            return Err(Error::Mismatch {
                tensor: stored.to_string(),
                detail: format!(
                    "{} {:?} in base ({}) but {} {:?} in tuned ({}): a patch keeps every \
                     tensor's shape and dtype",
                    a.1.dtype,
                    a.1.shape,
                    a.0.path.display(),
                    b.1.dtype,
                    b.1.shape,
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
    // Before the pass: every tensor's description in the metadata (its name, two 64-hex
    // fingerprints, shape, dtype, count, form) is at least this long, so a header past the
    // readers' limit is known now, not after minutes of reading; the exact check follows the
    // pass.
    let least: u64 = jobs.iter().map(|j| j.name.len() as u64 + 2 * 64 + 60).sum();
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

    let mut idx_file = Scratch::new(out, "indices")?;
    let mut val_file = Scratch::new(out, "values")?;
    let window = 2 * rayon::current_num_threads().max(1);
    // The pass's groups of chunks in the order it takes them (job by job, `window` chunks at
    // a time), for the readers that read cold files ahead of it.
    let group_len = window * CHUNK;
    let groups = jobs.iter().flat_map(|job| {
        let n = job.a.1.numel as usize;
        (0..n).step_by(group_len).map(move |g| {
            let len = group_len.min(n - g);
            [job.a, job.b]
                .map(|(shard, t)| readahead::Stretch {
                    shard,
                    offset: t.offset + g * t.dtype.size(),
                    len: len * t.dtype.size(),
                })
                .to_vec()
        })
    });
    let mut spans = Vec::with_capacity(jobs.len());
    readahead::ahead(groups, |took| -> Result<()> {
        let mut taken = 0;
        for job in &jobs {
            let (t, size) = (job.a.1, job.a.1.dtype.size());
            let n = t.numel as usize;
            let wide = index_width(t.numel) == 8;
            let (ra, rb) = (job.a.0.bytes(job.a.1), job.b.0.bytes(job.b.1));
            let starts: Vec<usize> = (0..n).step_by(CHUNK).collect();
            let only = starts.len() == 1;
            let mut span = Span {
                changed: 0,
                wide,
                idx_at: idx_file.len,
                val_at: val_file.len,
                stored: 0,
                frames: Vec::new(),
                prints: (Vec::new(), Vec::new()),
            };
            for group in starts.chunks(window) {
                took(taken);
                taken += 1;
                let parts = group
                    .par_iter()
                    .map(|&s| {
                        progress.check()?;
                        let len = CHUNK.min(n - s);
                        let (x, y) = (
                            &ra[s * size..(s + len) * size],
                            &rb[s * size..(s + len) * size],
                        );
                        let (mut idx, mut vals) = (Vec::new(), Vec::new());
                        changed_into(x, y, size, s as u64, wide, &mut idx, &mut vals);
                        let count = (vals.len() / size.max(1)) as u64;
                        if codec == Codec::Compact && count > 0 {
                            // Offsets from the chunk's first element; the frame replaces both.
                            let iw = if wide { 8 } else { 4 };
                            let offsets = idx.chunks_exact(iw).map(|b| {
                                let mut w = [0u8; 8];
                                w[..iw].copy_from_slice(b);
                                u64::from_le_bytes(w) - s as u64
                            });
                            vals = crate::codec::encode(offsets, &vals, size);
                            idx.clear();
                        }
                        progress
                            .done
                            .fetch_add(2 * x.len() as u64, Ordering::Relaxed);
                        // The fingerprints, hashed while the piece is in the cache.
                        let off = (s * size) as u64;
                        let prints =
                            rayon::join(|| piece_print(x, off, only), || piece_print(y, off, only));
                        job.a.0.check_faults()?;
                        job.b.0.check_faults()?;
                        Ok((s as u64, count, idx, vals, prints))
                    })
                    .collect::<Result<Vec<_>>>()?;
                for (start, count, idx, vals, (pa, pb)) in parts {
                    span.prints.0.push(pa);
                    span.prints.1.push(pb);
                    if count == 0 {
                        continue;
                    }
                    span.changed += count;
                    span.stored += (idx.len() + vals.len()) as u64;
                    if codec == Codec::Compact {
                        span.frames.push(Frame {
                            start,
                            count,
                            bytes: vals.len() as u64,
                        });
                    }
                    idx_file.write(out, &idx)?;
                    val_file.write(out, &vals)?;
                }
            }
            spans.push(span);
        }
        Ok(())
    })?;
    for f in [&mut idx_file, &mut val_file] {
        f.file.flush().map_err(|e| Error::output(out, e))?;
    }

    let prints: Vec<(String, String)> = spans
        .iter()
        .map(|s| {
            (
                merged_fingerprint(&s.prints.0),
                merged_fingerprint(&s.prints.1),
            )
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
    for (k, (job, span)) in jobs.iter().zip(&spans).enumerate() {
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
                    let (idx, vals) = span.decode(&val_file, out, size as usize, job.a.1.numel)?;
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
    // Scratch ranges are copied file to file (the kernel's copy_file_range where it can).
    let (idx_raw, val_raw) = (idx_file.file.get_ref(), val_file.file.get_ref());
    for (_, _, _, _, source) in &stored {
        match source {
            Source::Indices(at, len) => file.copy_from(idx_raw, *at, *len)?,
            Source::Values(at, len) => file.copy_from(val_raw, *at, *len)?,
            Source::Dense(k) => file.write(jobs[*k].b.0.bytes(jobs[*k].b.1))?,
            Source::Table(bytes) => file.write(bytes)?,
        }
    }
    check_all_unchanged(jobs.iter().map(|j| j.b.0))?;
    progress.check()?; // the last moment a cancel leaves nothing behind
    let bytes = file.finish()?;
    Ok(Created { entries, bytes })
}

/// A file written under a temporary name beside its target, synced and renamed over it by
/// [`AtomicFile::finish`]; removed if dropped unfinished.
struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    file: Option<BufWriter<File>>,
    len: u64,
}

impl AtomicFile {
    fn create(path: &Path) -> Result<AtomicFile> {
        let tmp = sibling(path, "part");
        let file = File::create(&tmp).map_err(|e| Error::output(path, e))?;
        Ok(AtomicFile {
            path: path.to_path_buf(),
            tmp,
            file: Some(BufWriter::with_capacity(1 << 20, file)),
            len: 0,
        })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        let f = self.file.as_mut().expect("open until finished");
        f.write_all(bytes)
            .map_err(|e| Error::output(&self.path, e))?;
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Appends `len` bytes of `src` from offset `at`.
    fn copy_from(&mut self, src: &File, at: u64, len: u64) -> Result<()> {
        let f = self.file.as_mut().expect("open until finished");
        f.flush().map_err(|e| Error::output(&self.path, e))?;
        let mut src = src;
        src.seek(std::io::SeekFrom::Start(at))
            .map_err(|e| Error::output(&self.path, e))?;
        let copied = std::io::copy(&mut src.take(len), f.get_mut())
            .map_err(|e| Error::output(&self.path, e))?;
        if copied != len {
            return Err(Error::output(
                &self.path,
                std::io::Error::other("a temporary file was shorter than written"),
            ));
        }
        self.len += len;
        Ok(())
    }

    fn finish(mut self) -> Result<u64> {
        let f = self.file.take().expect("open until finished");
        let done = f
            .into_inner()
            .map_err(|e| e.into_error())
            .and_then(|f| f.sync_all())
            .and_then(|_| std::fs::rename(&self.tmp, &self.path));
        done.map_err(|e| Error::output(&self.path, e))?;
        Ok(self.len)
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Checks that `patches` apply to `base` in this order, from their descriptions alone: the
/// first describes exactly `base`'s tensors with their shapes and dtypes, and each next one
/// starts from the fingerprints the one before ends at.
fn check_chain(base: &Checkpoint, patches: &[&Patch]) -> Result<()> {
    let Some(first) = patches.first() else {
        return Err(Error::InvalidArgument("no patch to apply".into()));
    };
    let names: BTreeSet<&str> = base.names().collect();
    let described: BTreeSet<&str> = first.entries.keys().map(String::as_str).collect();
    if let Some(n) = names.symmetric_difference(&described).next() {
        let (where_, other) = if names.contains(n) {
            ("base", "the patch")
        } else {
            ("the patch", "base")
        };
        return Err(Error::Pairing {
            reason: format!(
                "patch {} was not made for {}: tensor '{n}' is in {where_} but not in {other}",
                first.path.display(),
                base.path.display()
            ),
        });
    }
    for (name, e) in &first.entries {
        let (_, t) = base.get(name).expect("checked above");
        if t.shape != e.shape || t.dtype.to_string() != e.dtype {
            return Err(Error::Mismatch {
                tensor: name.clone(),
                detail: format!(
                    "{} {:?} in base but {} {:?} in patch {}",
                    t.dtype,
                    t.shape,
                    e.dtype,
                    e.shape,
                    first.path.display()
                ),
            });
        }
    }
    for (k, pair) in patches.windows(2).enumerate() {
        let (p, q) = (&pair[0], &pair[1]);
        for (name, e) in &p.entries {
            let next = q.entries.get(name);
            if next.is_none_or(|f| f.base != e.tuned) {
                return Err(Error::Pairing {
                    reason: format!(
                        "patch {} ({}) does not start where patch {} ({}) ends, at tensor \
                         '{name}': a patch is missing, repeated or out of order",
                        k + 2,
                        q.path.display(),
                        k + 1,
                        p.path.display()
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Streams one tensor of `base` through `patches` in pieces: each piece is handed to `sink`
/// after every patch has written over it; checks `base`'s fingerprint against the first
/// patch and the result's against the last (and `tuned`'s bytes when given).
fn stream_tensor(
    name: &str,
    bytes: &[u8],
    dtype: Dtype,
    patches: &[&Patch],
    path: &Path,
    sink: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let size = dtype.size().max(1);
    let entries: Vec<&Entry> = patches.iter().map(|p| &p.entries[name]).collect();
    let mut walks: Vec<Option<Changes>> = patches
        .iter()
        .zip(&entries)
        .map(|(p, e)| {
            matches!(e.form, Form::Sparse | Form::Compact).then(|| Changes::new(p, name, e))
        })
        .collect();
    let (mut before, mut after) = (blake3::Hasher::new(), blake3::Hasher::new());
    // Elements each dense entry actually changes, checked against the count it states.
    let mut dense_changed = vec![0u64; patches.len()];
    let mut buf = vec![0u8; PIECE.min(bytes.len())];
    let piece_len = (PIECE / size) * size;
    let mut at = 0;
    while at < bytes.len() {
        let n = piece_len.min(bytes.len() - at);
        let piece = &mut buf[..n];
        piece.copy_from_slice(&bytes[at..at + n]);
        before.update(piece);
        let (first, end) = ((at / size) as u64, ((at + n) / size) as u64);
        for (((p, e), walk), counted) in patches
            .iter()
            .zip(&entries)
            .zip(&mut walks)
            .zip(&mut dense_changed)
        {
            match (e.form, walk) {
                (Form::Sparse | Form::Compact, Some(w)) => w.write_until(first, end, piece)?,
                (Form::Dense, _) => {
                    let (_, bytes) = p.stored(&format!("{name}.dense")).expect("validated");
                    let new = &bytes[at..at + n];
                    *counted += piece
                        .chunks_exact(size)
                        .zip(new.chunks_exact(size))
                        .filter(|(old, new)| old != new)
                        .count() as u64;
                    piece.copy_from_slice(new);
                }
                _ => {}
            }
        }
        after.update(piece);
        sink(piece)?;
        at += n;
    }
    for walk in walks.iter().flatten() {
        walk.finish()?;
    }
    if before.finalize().to_hex().as_str() != entries[0].base {
        return Err(Error::Pairing {
            reason: format!(
                "tensor '{name}' of {} is not the one patch {} was made from (its fingerprint \
                 differs): a patch applies only to the checkpoint it was created against",
                path.display(),
                patches[0].path.display()
            ),
        });
    }
    for ((p, e), counted) in patches.iter().zip(&entries).zip(&dense_changed) {
        if e.form == Form::Dense && *counted != e.changed {
            return Err(corrupt(
                &p.path,
                Some(name),
                format!(
                    "corrupt patch: the tensor is stored whole and said to change {} elements, \
                     but its data changes {counted}",
                    e.changed
                ),
            ));
        }
    }
    let last = patches.last().expect("at least one");
    if after.finalize().to_hex().as_str() != entries[entries.len() - 1].tuned {
        return Err(corrupt(
            &last.path,
            Some(name),
            "corrupt patch: the patched tensor does not have the fingerprint the patch \
             promises",
        ));
    }
    Ok(())
}

/// Applies `patches` in order to `base` and writes the result as a checkpoint directory
/// `out` (which must not exist, or be empty): `base`'s shards with the same headers, its index
/// and the other files of its directory, every tensor patched. `base` is never modified; `out`
/// appears complete or not at all.
pub fn apply(base: &Checkpoint, patches: &[&Patch], out: &Path, progress: &Progress) -> Result<()> {
    check_chain(base, patches)?;
    if out.exists()
        && std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(Error::output(
            out,
            std::io::Error::other("exists and is not an empty directory"),
        ));
    }
    let tmp = sibling(out, "apply");
    std::fs::create_dir_all(&tmp).map_err(|e| Error::output(out, e))?;
    struct Cleanup(PathBuf, bool);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            if !self.1 {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }
    let mut cleanup = Cleanup(tmp.clone(), false);
    let total: u64 = base
        .shards
        .iter()
        .map(|s| s.file_bytes().len() as u64)
        .sum();
    progress.total.store(total, Ordering::Relaxed);

    base.shards.par_iter().try_for_each(|shard| {
        let name = shard
            .path
            .file_name()
            .ok_or_else(|| Error::output(out, std::io::Error::other("a shard has no name")))?;
        let target = tmp.join(name);
        let file = File::create(&target).map_err(|e| Error::output(out, e))?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let all = shard.file_bytes();
        let mut tensors: Vec<&TensorInfo> = shard.tensors.iter().collect();
        tensors.sort_by_key(|t| t.offset);
        let data_start = tensors.first().map_or(all.len(), |t| t.offset);
        let mut write = |bytes: &[u8]| -> Result<()> {
            progress.check()?;
            progress
                .done
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            w.write_all(bytes).map_err(|e| Error::output(out, e))
        };
        write(&all[..data_start])?;
        let mut at = data_start;
        for t in tensors {
            write(&all[at..t.offset])?;
            stream_tensor(
                &t.name,
                shard.bytes(t),
                t.dtype,
                patches,
                &base.path,
                &mut write,
            )?;
            at = t.offset + t.len;
        }
        write(&all[at..])?;
        shard.check_faults()?;
        shard.check_unchanged()?;
        let f = w
            .into_inner()
            .map_err(|e| Error::output(out, e.into_error()))?;
        f.sync_all().map_err(|e| Error::output(out, e))?;
        // The rebuilt shard is as private as the base's (a 0600 base stays 0600).
        let mode = std::fs::metadata(&shard.path).map_err(|e| Error::io(&shard.path, e))?;
        std::fs::set_permissions(&target, mode.permissions()).map_err(|e| Error::output(out, e))
    })?;
    // The rest of a checkpoint directory that describes the model: its index, config,
    // generation config and tokenizer files, never a trainer's state (optimizer, scheduler,
    // RNG), which belongs to the run that made the base. std::fs::copy keeps permissions.
    if let Some(dir) = base_dir(base) {
        let mode = std::fs::metadata(&dir).map_err(|e| Error::io(&dir, e))?;
        std::fs::set_permissions(&tmp, mode.permissions()).map_err(|e| Error::output(out, e))?;
        let shards: BTreeSet<&std::ffi::OsStr> = base
            .shards
            .iter()
            .filter_map(|s| s.path.file_name())
            .collect();
        for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let entry = entry.map_err(|e| Error::io(&dir, e))?;
            let p = entry.path();
            let model_file = entry.file_name().to_str().is_some_and(is_model_file);
            if p.is_file() && model_file && !shards.contains(entry.file_name().as_os_str()) {
                std::fs::copy(&p, tmp.join(entry.file_name()))
                    .map_err(|e| Error::output(out, e))?;
            }
        }
    }
    progress.check()?; // the last moment a cancel leaves nothing behind
    if out.exists() {
        std::fs::remove_dir(out).map_err(|e| Error::output(out, e))?;
    }
    std::fs::rename(&tmp, out).map_err(|e| Error::output(out, e))?;
    cleanup.1 = true;
    Ok(())
}

/// Whether a file beside the shards describes the model (and so belongs in a checkpoint that
/// `apply` rebuilds): the index, `config.json`, `generation_config.json`, tokenizer and
/// processor files. Training state (`optimizer.pt`, `scheduler.pt`, `rng_state.pth`,
/// `trainer_state.json`, `training_args.bin`) and anything else is not copied.
pub fn is_model_file(name: &str) -> bool {
    const EXACT: &[&str] = &[
        "config.json",
        "generation_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "merges.txt",
        "preprocessor_config.json",
        "processor_config.json",
        "spiece.model",
        "sentencepiece.bpe.model",
    ];
    EXACT.contains(&name)
        || name.ends_with(".safetensors.index.json")
        || name.starts_with("tokenizer")
        || name.starts_with("vocab.")
        || name.starts_with("chat_template.")
}

/// The directory of a checkpoint opened from a directory or an index file (whose other files
/// belong to it); None for a single `.safetensors` file named directly.
fn base_dir(base: &Checkpoint) -> Option<PathBuf> {
    if base.path.is_dir() {
        return Some(base.path.clone());
    }
    if base.path.extension().is_some_and(|e| e == "json") {
        return base.path.parent().map(Path::to_path_buf);
    }
    None
}

/// Checks, without writing anything, that `patch` applies to `base` and gives the tensors it
/// promises, and when `tuned` is given that those are `tuned`'s (by fingerprint of its bytes).
pub fn verify(
    base: &Checkpoint,
    patch: &Patch,
    tuned: Option<&Checkpoint>,
    progress: &Progress,
) -> Result<()> {
    let patches = &[patch];
    check_chain(base, patches)?;
    let names: Vec<&str> = base.names().collect();
    names.par_iter().try_for_each(|name| {
        progress.check()?;
        let (shard, t) = base.get(name).expect("listed");
        stream_tensor(
            name,
            shard.bytes(t),
            t.dtype,
            patches,
            &base.path,
            &mut |_| Ok(()),
        )?;
        if let Some(c) = tuned {
            let (ts, tt) = c.get(name).ok_or_else(|| Error::Pairing {
                reason: format!("tensor '{name}' is not in {}", c.path.display()),
            })?;
            if fingerprint(ts.bytes(tt)) != patch.entries[*name].tuned {
                return Err(Error::Pairing {
                    reason: format!(
                        "tensor '{name}' of {} is not what patch {} gives",
                        c.path.display(),
                        patch.path.display()
                    ),
                });
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fingerprint merged from the pass's pieces is BLAKE3's hash of the whole tensor, for
    /// every length around the pieces' boundaries: none, one short piece, exactly one, one
    /// and a byte, and trees of 3, 4, 5 and 7 pieces (left subtrees of 2 and 4 pieces, right
    /// ones of 1 and 3, a short right edge).
    #[test]
    fn pieces_merge_into_the_hash_of_the_whole() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let bytes: Vec<u8> = (0..(7 * CHUNK * 2))
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        for size in [1usize, 2] {
            let piece = CHUNK * size;
            for len in [
                0,
                1,
                1000,
                piece,
                piece + 1,
                3 * piece - 5,
                4 * piece,
                5 * piece + 7,
                7 * piece - 3,
            ] {
                let whole = &bytes[..len];
                let n = len.div_ceil(piece);
                let prints: Vec<ChainingValue> = whole
                    .chunks(piece)
                    .enumerate()
                    .map(|(i, p)| piece_print(p, (i * piece) as u64, n == 1))
                    .collect();
                assert_eq!(
                    merged_fingerprint(&prints),
                    blake3::hash(whole).to_hex().to_string(),
                    "size {size}, {len} bytes"
                );
            }
        }
    }
}

//! Sparse patches (design §9): a safetensors file that turns checkpoint B into checkpoint C
//! exactly. Per changed tensor, `NAME.indices` (I32 flat ascending, I64 past 2^31 elements) and
//! `NAME.values` (C's values at those indices, in the tensor's own dtype), or `NAME.dense` (C's
//! whole tensor) where that is smaller; `__metadata__` holds `format=rlmask-patch`, `version`,
//! and `tensors`: every tensor of B with its shape, dtype, changed count, form and the
//! fingerprints of its bytes in B and in C ([`fingerprint`]). With `codec=compact` a sparse
//! tensor is stored as `NAME.frames` (int64 rows: first element, changes, bytes) and
//! `NAME.compact` (the frames of [`crate::codec`], one after another) instead of indices and
//! values.
//!
//! Creating is one streaming pass over both checkpoints (changed positions found a 64-byte
//! block at a time), each tensor's pieces written into the patch as the tensor finishes, in
//! B's order, aligned by `NAME.pad` (version 3), the header written last into room kept for
//! it: each change is written once and memory holds one tensor's changes at most. Applying
//! streams B's shards into new files a piece at a time, with each patch's entries written
//! over each piece in order, checking B's fingerprint before and C's after; patches chain by
//! fingerprint, so a missing, repeated or reordered patch is refused before anything is
//! written.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{BufWriter, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::checkpoint::Checkpoint;
use crate::codec::Frame;
use crate::diff::Progress;
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::readahead;
use crate::safetensors::{check_all_unchanged, check_header_len, Shard, TensorInfo};
use crate::sides::Side;

/// The `format` of a patch file.
pub const FORMAT: &str = "rlmask-patch";
/// The version written: 3, fingerprints in the XXH3-128 tree ([`fingerprint`]), stored
/// tensors in B's order with `NAME.pad` between them.
pub const VERSION: &str = "3";
/// The versions read, with the scheme their fingerprints are written in: version 1 carries
/// BLAKE3; version 2 has no `NAME.pad`.
const VERSIONS: [(&str, Scheme); 3] = [
    ("1", Scheme::Blake3),
    ("2", Scheme::Tree),
    ("3", Scheme::Tree),
];

/// Elements compared per unit of parallel work.
const CHUNK: usize = 1 << 20;
/// Bytes streamed per piece when applying.
const PIECE: usize = 4 << 20;
// Every piece a pass hashes is whole leaves of the fingerprints' tree (the last may be short):
// 2^20 elements of any size when creating, 4 MiB when applying.
const _: () = assert!(CHUNK.is_multiple_of(LEAF) && PIECE.is_multiple_of(LEAF));

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
    /// The fingerprints of the tensor's raw bytes in B and in C ([`fingerprint`]; BLAKE3 in
    /// patches of version 1).
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
    /// How its fingerprints are made (by its version).
    pub scheme: Scheme,
    /// The frames of each compact sparse tensor, validated against its entry.
    frames: BTreeMap<String, Vec<Frame>>,
    /// Where each stored key (`NAME.indices`, `NAME.values`, ...) is in the shard's tensors:
    /// looked up once per tensor, so applying is linear in the number of tensors.
    index: HashMap<String, usize>,
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
        let version = meta.get("version").map(String::as_str);
        let Some(&(_, scheme)) = VERSIONS.iter().find(|(v, _)| Some(*v) == version) else {
            return Err(corrupt(
                path,
                None,
                match version {
                    Some(v) => format!(
                        "patch version {v:?} is not one this rlmask reads (1 to {VERSION}); a \
                         newer rlmask may have written it"
                    ),
                    None => "the patch states no version".to_string(),
                },
            ));
        };
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
            for print in [&e.base, &e.tuned] {
                if Scheme::of(print) != Some(scheme) {
                    return Err(corrupt(
                        path,
                        Some(name),
                        format!(
                            "{print:?} is not a fingerprint of a version {version:?} patch",
                            version = version.unwrap_or_default()
                        ),
                    ));
                }
            }
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
        // Version 3 aligns each tensor's pieces with up to 7 bytes of `NAME.pad` (U8).
        let padding = |t: &TensorInfo| {
            version == Some("3")
                && t.name
                    .strip_suffix(".pad")
                    .is_some_and(|n| entries.contains_key(n))
                && t.dtype == Dtype::U8
                && matches!(t.shape[..], [1..=7])
        };
        if let Some(t) = shard
            .tensors
            .iter()
            .find(|t| !described.contains(&t.name) && !padding(t))
        {
            return Err(corrupt(
                path,
                Some(&t.name),
                "stored in the patch but not described",
            ));
        }
        if let Some(t) = shard
            .tensors
            .iter()
            .find(|t| padding(t) && shard.bytes(t).iter().any(|&b| b != 0))
        {
            return Err(corrupt(
                path,
                t.name.strip_suffix(".pad"),
                format!("its padding ('{}') is not zeros", t.name),
            ));
        }
        let index: HashMap<String, usize> = shard
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        let mut frames = BTreeMap::new();
        for (name, e) in entries.iter().filter(|(_, e)| e.form == Form::Compact) {
            let find = |key: String| &shard.tensors[index[&key]];
            frames.insert(name.clone(), read_frames(path, &shard, find, name, e)?);
        }
        let metadata = shard.metadata.clone();
        Ok(Patch {
            path: path.to_path_buf(),
            shard,
            entries,
            metadata,
            codec,
            scheme,
            frames,
            index,
        })
    }

    fn stored(&self, key: &str) -> Option<(&TensorInfo, &[u8])> {
        let t = &self.shard.tensors[*self.index.get(key)?];
        Some((t, self.shard.bytes(t)))
    }

    /// Bytes stored, by kind: `indices`, `values` (plain sparse), `compact` (frames and
    /// their table), `dense` (padding not counted).
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
                Some("pad") => continue,
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
/// The frames of the compact tensor `name`, validated; `find` gives a stored key's tensor
/// (present: checked before).
fn read_frames<'s>(
    path: &Path,
    shard: &'s Shard,
    find: impl Fn(String) -> &'s TensorInfo,
    name: &str,
    e: &Entry,
) -> Result<Vec<Frame>> {
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
        if f.count > CHUNK as u64 {
            // Create cuts a frame per span of CHUNK elements: a frame claiming more changes
            // would only make the decoder reserve memory for them.
            return Err(bad(format!(
                "frame {} claims {} changes; a frame holds at most {CHUNK}",
                frames.len(),
                f.count
            )));
        }
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

mod apply;
mod create;
mod fingerprint;
mod inplace;

pub use apply::{apply, is_model_file, verify};
pub use create::{create, Created};
pub use fingerprint::{fingerprint, matches, Scheme, LEAF};
pub use inplace::{apply_in_place, recover, JOURNAL};

#[cfg(test)]
mod tests {
    use super::fingerprint::{leaf, root, Streaming};
    use super::*;

    /// The fingerprint from leaves hashed piece by piece (as create hashes them), streamed (as
    /// apply hashes them) and of the whole agree, for every length around the leaves'
    /// boundaries: none, one short leaf, exactly one, one and a byte, several and a short one;
    /// and they differ from the fingerprint of the same bytes one shorter.
    #[test]
    fn leaves_merge_into_the_fingerprint_of_the_whole() {
        let bytes = crate::testing::random_bytes(0x9E37_79B9_7F4A_7C15u64, 7 * LEAF + 9);
        for len in [
            0,
            1,
            1000,
            LEAF,
            LEAF + 1,
            3 * LEAF - 5,
            4 * LEAF,
            7 * LEAF + 9,
        ] {
            let whole = &bytes[..len];
            let print = fingerprint(whole);
            assert_eq!(Scheme::of(&print), Some(Scheme::Tree));
            for piece in [LEAF, 2 * LEAF, 64 * LEAF] {
                let mut leaves = Vec::new();
                let mut streamed = Streaming::like(&print);
                for p in whole.chunks(piece) {
                    leaves.extend(p.chunks(LEAF).map(leaf));
                    streamed.update(p);
                }
                assert_eq!(root(&leaves, len as u64), print, "{len} bytes");
                assert!(streamed.matches(&print), "{len} bytes streamed");
            }
            assert!(matches(whole, &print));
            if len > 0 {
                assert_ne!(fingerprint(&whole[..len - 1]), print);
            }
            let old = blake3::hash(whole).to_hex().to_string();
            assert!(matches(whole, &old));
            let mut streamed = Streaming::like(&old);
            whole.chunks(4 * LEAF).for_each(|p| streamed.update(p));
            assert!(streamed.matches(&old));
        }
        assert_eq!(Scheme::of(&"A".repeat(32)), None);
        assert_eq!(Scheme::of("abc"), None);
    }
}

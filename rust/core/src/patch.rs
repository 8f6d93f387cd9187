//! Sparse patches (design §9): a safetensors file that turns checkpoint B into checkpoint C
//! exactly. Per changed tensor, `NAME.indices` (I32 flat ascending, I64 past 2^31 elements) and
//! `NAME.values` (C's values at those indices, in the tensor's own dtype), or `NAME.dense` (C's
//! whole tensor) where that is smaller; `__metadata__` holds `format=rlmask-patch`, `version`,
//! and `tensors`: every tensor of B with its shape, dtype, changed count, form and the blake3
//! fingerprints of its bytes in B and in C.
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

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::checkpoint::Checkpoint;
use crate::diff::{Progress, Side};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::safetensors::{Shard, TensorInfo};

/// The `format` of a patch file.
pub const FORMAT: &str = "rlmask-patch";
/// The version written and read.
pub const VERSION: &str = "1";

/// Elements compared per unit of parallel work.
const CHUNK: usize = 1 << 20;
/// Bytes streamed per piece when applying.
const PIECE: usize = 4 << 20;

/// How a tensor is stored in a patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Form {
    /// Unchanged: nothing stored.
    None,
    /// `NAME.indices` and `NAME.values`.
    Sparse,
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
        let stored: BTreeMap<&str, &TensorInfo> =
            shard.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
        let mut described = BTreeSet::new();
        for (name, e) in &entries {
            let dtype = Dtype::parse(&e.dtype)
                .ok_or_else(|| corrupt(path, Some(name), format!("unknown dtype {}", e.dtype)))?;
            let want: Vec<(String, Option<Dtype>, Vec<u64>)> = match e.form {
                Form::None => vec![],
                Form::Dense => vec![(format!("{name}.dense"), Some(dtype), e.shape.clone())],
                Form::Sparse => vec![
                    (format!("{name}.indices"), None, vec![e.changed]),
                    (format!("{name}.values"), Some(dtype), vec![e.changed]),
                ],
            };
            if e.form == Form::None && e.changed != 0 || e.changed > e.numel() {
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
                if !dt_ok || t.shape != shape {
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
        let metadata = shard.metadata.clone();
        Ok(Patch {
            path: path.to_path_buf(),
            shard,
            entries,
            metadata,
        })
    }

    fn stored(&self, key: &str) -> Option<(&TensorInfo, &[u8])> {
        let t = self.shard.tensors.iter().find(|t| t.name == key)?;
        Some((t, self.shard.bytes(t)))
    }

    /// Bytes stored, by form: (sparse indices, sparse values, dense).
    pub fn bytes(&self) -> (u64, u64, u64) {
        let mut out = (0, 0, 0);
        for t in &self.shard.tensors {
            let n = t.len as u64;
            if t.name.ends_with(".indices") {
                out.0 += n;
            } else if t.name.ends_with(".values") {
                out.1 += n;
            } else {
                out.2 += n;
            }
        }
        out
    }
}

/// blake3 of `bytes`, hex, hashed on every core: a tensor's fingerprint in a patch.
pub fn fingerprint(bytes: &[u8]) -> String {
    let mut h = blake3::Hasher::new();
    h.update_rayon(bytes);
    h.finalize().to_hex().to_string()
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
    // Room for every element; values take 8 bytes of slack for the word-wide writes.
    idx.resize(i0 + n * iw, 0);
    vals.resize(v0 + n * size + 8, 0);
    let (iout, vout) = (&mut idx[i0..], &mut vals[v0..]);
    let mut count = 0usize;
    let lanes = 8 / size;
    let bits = 8 * size as u32;
    let lane_mask = if size == 8 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    let mut keep = |e: usize, value: u64, changed: bool| {
        let i = first + e as u64;
        if wide {
            iout[count * 8..count * 8 + 8].copy_from_slice(&i.to_le_bytes());
        } else {
            iout[count * 4..count * 4 + 4].copy_from_slice(&(i as u32).to_le_bytes());
        }
        vout[count * size..count * size + 8].copy_from_slice(&value.to_le_bytes());
        count += usize::from(changed);
    };
    let words = a.len() / 8;
    for (w, (x, y)) in a.chunks_exact(8).zip(b.chunks_exact(8)).enumerate() {
        let x = u64::from_le_bytes(x.try_into().expect("8 bytes"));
        let y = u64::from_le_bytes(y.try_into().expect("8 bytes"));
        let d = x ^ y;
        if d != 0 {
            for k in 0..lanes {
                let shift = bits * k as u32;
                keep(
                    w * lanes + k,
                    (y >> shift) & lane_mask,
                    (d >> shift) & lane_mask != 0,
                );
            }
        }
    }
    for e in words * lanes..n {
        let (x, y) = (&a[e * size..(e + 1) * size], &b[e * size..(e + 1) * size]);
        let mut v = [0u8; 8];
        v[..size].copy_from_slice(y);
        keep(e, u64::from_le_bytes(v), x != y);
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
    provenance: &BTreeMap<String, String>,
    progress: &Progress,
) -> Result<Created> {
    let sa = Side::new(base, "base", name_map)?;
    let sb = Side::new(tuned, "tuned", name_map)?;
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
        jobs.push(Job { name: stored, a, b });
    }
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
    // Per job: (changed, offset in the indices scratch, offset in the values scratch).
    let mut spans = Vec::with_capacity(jobs.len());
    for job in &jobs {
        let (t, size) = (job.a.1, job.a.1.dtype.size());
        let n = t.numel as usize;
        let wide = t.numel > i32::MAX as u64 + 1;
        let (ra, rb) = (job.a.0.bytes(job.a.1), job.b.0.bytes(job.b.1));
        let starts: Vec<usize> = (0..n).step_by(CHUNK).collect();
        let span = (idx_file.len, val_file.len);
        let mut changed = 0u64;
        for group in starts.chunks(window) {
            let parts = group
                .par_iter()
                .map(|&s| {
                    if progress.cancel.load(Ordering::Relaxed) {
                        return Err(Error::Cancelled);
                    }
                    let len = CHUNK.min(n - s);
                    job.a.0.prefetch(t, s * size, len * size);
                    job.b.0.prefetch(job.b.1, s * size, len * size);
                    let (x, y) = (
                        &ra[s * size..(s + len) * size],
                        &rb[s * size..(s + len) * size],
                    );
                    let (mut idx, mut vals) = (Vec::new(), Vec::new());
                    changed_into(x, y, size, s as u64, wide, &mut idx, &mut vals);
                    progress
                        .done
                        .fetch_add(2 * x.len() as u64, Ordering::Relaxed);
                    job.a.0.check_faults()?;
                    job.b.0.check_faults()?;
                    Ok((idx, vals))
                })
                .collect::<Result<Vec<_>>>()?;
            for (idx, vals) in parts {
                changed += (vals.len() / size.max(1)) as u64;
                idx_file.write(out, &idx)?;
                val_file.write(out, &vals)?;
            }
        }
        spans.push((changed, span, wide));
    }
    for f in [&mut idx_file, &mut val_file] {
        f.file.flush().map_err(|e| Error::output(out, e))?;
    }

    // Fingerprints, then the entries.
    let prints: Vec<(String, String)> = jobs
        .iter()
        .map(|j| {
            (
                fingerprint(j.a.0.bytes(j.a.1)),
                fingerprint(j.b.0.bytes(j.b.1)),
            )
        })
        .collect();
    for j in &jobs {
        j.a.0.check_unchanged()?;
        j.b.0.check_unchanged()?;
    }
    let mut entries = BTreeMap::new();
    for ((job, &(changed, _, wide)), (fa, fb)) in jobs.iter().zip(&spans).zip(prints) {
        let t = job.a.1;
        let sparse = changed * ((if wide { 8 } else { 4 }) + t.dtype.size() as u64);
        let form = if changed == 0 {
            Form::None
        } else if sparse >= t.len as u64 {
            Form::Dense
        } else {
            Form::Sparse
        };
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
    }
    let mut stored: Vec<(String, Dtype, Vec<u64>, u64, Source)> = Vec::new();
    for (k, (job, &(changed, (io, vo), wide))) in jobs.iter().zip(&spans).enumerate() {
        let e = &entries[job.name];
        let (dtype, size) = (job.a.1.dtype, job.a.1.dtype.size() as u64);
        match e.form {
            Form::None => {}
            Form::Dense => stored.push((
                format!("{}.dense", job.name),
                dtype,
                e.shape.clone(),
                job.a.1.len as u64,
                Source::Dense(k),
            )),
            Form::Sparse => {
                let (idt, iw) = if wide {
                    (Dtype::I64, 8)
                } else {
                    (Dtype::I32, 4)
                };
                stored.push((
                    format!("{}.indices", job.name),
                    idt,
                    vec![changed],
                    changed * iw,
                    Source::Indices(io, changed * iw),
                ));
                stored.push((
                    format!("{}.values", job.name),
                    dtype,
                    vec![changed],
                    changed * size,
                    Source::Values(vo, changed * size),
                ));
            }
        }
    }
    stored.sort_by_key(|s| std::cmp::Reverse(s.1.size()));
    let mut metadata = provenance.clone();
    metadata.insert("format".into(), FORMAT.into());
    metadata.insert("version".into(), VERSION.into());
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

    let mut file = AtomicFile::create(out)?;
    file.write(&(text.len() as u64).to_le_bytes())?;
    file.write(&text)?;
    // Scratch ranges are copied file to file (the kernel's copy_file_range where it can).
    let (idx_raw, val_raw) = (idx_file.file.get_ref(), val_file.file.get_ref());
    for (_, _, _, _, source) in &stored {
        match *source {
            Source::Indices(at, len) => file.copy_from(idx_raw, at, len)?,
            Source::Values(at, len) => file.copy_from(val_raw, at, len)?,
            Source::Dense(k) => file.write(jobs[k].b.0.bytes(jobs[k].b.1))?,
        }
    }
    for j in &jobs {
        j.b.0.check_unchanged()?;
    }
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

/// Writes `piece` (bytes `at..at + piece.len()` of tensor `name`, of `size`-byte elements)
/// over with what `patch` stores for it. `cursor` walks the sparse indices across pieces.
fn patch_piece(
    patch: &Patch,
    name: &str,
    e: &Entry,
    size: usize,
    at: usize,
    piece: &mut [u8],
    cursor: &mut usize,
) -> Result<()> {
    match e.form {
        Form::None => Ok(()),
        Form::Dense => {
            let (_, bytes) = patch.stored(&format!("{name}.dense")).expect("validated");
            piece.copy_from_slice(&bytes[at..at + piece.len()]);
            Ok(())
        }
        Form::Sparse => {
            let (it, idx) = patch.stored(&format!("{name}.indices")).expect("validated");
            let (_, vals) = patch.stored(&format!("{name}.values")).expect("validated");
            let iw = it.dtype.size();
            let read = |k: usize| -> u64 {
                let raw = &idx[k * iw..(k + 1) * iw];
                if iw == 8 {
                    i64::from_le_bytes(raw.try_into().expect("8")) as u64
                } else {
                    u32::from_le_bytes(raw.try_into().expect("4")) as u64
                }
            };
            let (first, end) = ((at / size) as u64, ((at + piece.len()) / size) as u64);
            let numel = e.numel();
            let bad = |i: u64| {
                corrupt(
                    &patch.path,
                    Some(name),
                    format!(
                        "corrupt patch: index {i} is out of range or out of order ({numel} \
                         elements)"
                    ),
                )
            };
            let mut prev = if *cursor > 0 {
                Some(read(*cursor - 1))
            } else {
                None
            };
            while *cursor < e.changed as usize {
                let i = read(*cursor);
                if i >= numel || prev.is_some_and(|p| p >= i) {
                    return Err(bad(i));
                }
                if i >= end {
                    break;
                }
                let (o, k) = ((i - first) as usize * size, *cursor * size);
                match size {
                    1 => piece[o] = vals[k],
                    2 => piece[o..o + 2].copy_from_slice(&vals[k..k + 2]),
                    4 => piece[o..o + 4].copy_from_slice(&vals[k..k + 4]),
                    _ => piece[o..o + size].copy_from_slice(&vals[k..k + size]),
                }
                prev = Some(i);
                *cursor += 1;
            }
            Ok(())
        }
    }
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
    let mut cursors = vec![0usize; patches.len()];
    let (mut before, mut after) = (blake3::Hasher::new(), blake3::Hasher::new());
    let mut buf = vec![0u8; PIECE.min(bytes.len())];
    let piece_len = (PIECE / size) * size;
    let mut at = 0;
    while at < bytes.len() {
        let n = piece_len.min(bytes.len() - at);
        let piece = &mut buf[..n];
        piece.copy_from_slice(&bytes[at..at + n]);
        before.update(piece);
        for ((p, e), c) in patches.iter().zip(&entries).zip(&mut cursors) {
            patch_piece(p, name, e, size, at, piece, c)?;
        }
        after.update(piece);
        sink(piece)?;
        at += n;
    }
    for ((p, e), c) in patches.iter().zip(&entries).zip(&cursors) {
        if e.form == Form::Sparse && *c != e.changed as usize {
            return Err(corrupt(
                &p.path,
                Some(name),
                "corrupt patch: an index is out of range or out of order",
            ));
        }
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
            if progress.cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
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
        f.sync_all().map_err(|e| Error::output(out, e))
    })?;
    // The rest of a checkpoint directory: its index, config and tokenizer files.
    if let Some(dir) = base_dir(base) {
        let shards: BTreeSet<&std::ffi::OsStr> = base
            .shards
            .iter()
            .filter_map(|s| s.path.file_name())
            .collect();
        for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let entry = entry.map_err(|e| Error::io(&dir, e))?;
            let p = entry.path();
            if p.is_file() && !shards.contains(entry.file_name().as_os_str()) {
                std::fs::copy(&p, tmp.join(entry.file_name()))
                    .map_err(|e| Error::output(out, e))?;
            }
        }
    }
    if out.exists() {
        std::fs::remove_dir(out).map_err(|e| Error::output(out, e))?;
    }
    std::fs::rename(&tmp, out).map_err(|e| Error::output(out, e))?;
    cleanup.1 = true;
    Ok(())
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
        if progress.cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
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

//! A run's checkpoints against its base in one pass (design §6; paper §6, Appendix D, Figures 2,
//! 5, 6, 7).
//!
//! For checkpoints `θ_1..θ_K` after `θ_0 = base`, every chunk of every tensor is read once from
//! each of the `K + 1` files, and in that chunk `θ_k` is compared with `θ_0` (changed-bits kept
//! for the chunk only) and with `θ_{k-1}` (counted). From the K chunk bitsets the chunk's share
//! of every figure follows at once: `ever` is their union, `final` the last, and Figure 6's
//! `outside_final[k]` is `|vs_base_k \ final|`. No bitset that grows with the model is held:
//! memory is a few chunk buffers per thread, whatever the model size and the number of
//! checkpoints. Masks per checkpoint, when asked for, stream into memory-mapped `.rlmask` files.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use rayon::prelude::*;

use crate::checkpoint::Checkpoint;
use crate::diff::{check_paired, mismatch, Pair, Progress, Side, CHUNK};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::kernel::{compare_run, Criterion, Run};
use crate::maskfile::{self, MaskEntry};
use crate::safetensors::{Shard, TensorInfo, U8FileWriter};

/// What to compare and how.
#[derive(Debug, Clone)]
pub struct TrajectoryOptions {
    /// One threshold: `Absolute` with one tolerance, `Exact`, or `Relative`.
    pub criterion: Criterion,
    /// Only these names (as paired) are considered (all when `None`).
    pub select: Option<Vec<String>>,
    /// Prefix translations applied to every checkpoint's names (see [`crate::names`]).
    pub name_map: Vec<(String, String)>,
    /// Leave out tensors whose shape or dtype differs in some checkpoint instead of failing.
    pub skip_mismatched: bool,
    /// One mask file per checkpoint (its changed-bits against the base), with provenance.
    pub mask_files: Option<Vec<crate::diff::MaskFileSpec>>,
}

/// The trajectory of one tensor.
#[derive(Debug, Clone)]
pub struct TensorTrajectory {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    pub numel: u64,
    /// `changed(θ_0, θ_k)` for each checkpoint.
    pub changed_vs_base: Vec<u64>,
    /// `changed(θ_{k-1}, θ_k)` for each checkpoint (`θ_0` before the first).
    pub changed_consecutive: Vec<u64>,
    /// `|vs_base_k \ final|` for each checkpoint.
    pub outside_final: Vec<u64>,
    /// Elements changed against the base in at least one checkpoint.
    pub ever: u64,
    /// Elements changed against the base in the last checkpoint.
    pub last: u64,
}

/// Everything a trajectory found.
#[derive(Debug, Clone)]
pub struct TrajectoryResult {
    pub tensors: Vec<TensorTrajectory>,
    /// Base tensors (selected, floating) absent from some checkpoint: name and the indices of
    /// the checkpoints that lack it; left out of every figure.
    pub incomplete: Vec<(String, Vec<usize>)>,
    /// Tensors left out, and why (not floating; shape or dtype differs somewhere, when
    /// skipping mismatches).
    pub skipped: Vec<crate::diff::Skipped>,
    /// Per checkpoint (base first): `(stored name, paired name)` of every rewritten name.
    pub renamed: Vec<Vec<(String, String)>>,
}

/// One tensor's location in the base and in each checkpoint.
struct Track<'a> {
    name: &'a str,
    base: (&'a Shard, &'a TensorInfo),
    steps: Vec<(&'a Shard, &'a TensorInfo)>,
}

/// Compares every checkpoint of `ckpts` with `base` and with its predecessor, in one pass.
pub fn trajectory(
    base: &Checkpoint,
    ckpts: &[&Checkpoint],
    opts: &TrajectoryOptions,
    progress: &Progress,
) -> Result<TrajectoryResult> {
    if ckpts.is_empty() {
        return Err(Error::InvalidArgument(
            "a trajectory needs at least one checkpoint after the base".into(),
        ));
    }
    if opts.criterion.thresholds() != 1 {
        return Err(Error::InvalidArgument(
            "a trajectory is computed at exactly one threshold".into(),
        ));
    }
    let bad = |v: f64| !(v.is_finite() && v >= 0.0);
    if opts.criterion.values().into_iter().any(bad) {
        return Err(Error::InvalidArgument(
            "tolerances must be finite and non-negative".into(),
        ));
    }
    if let Some(files) = &opts.mask_files {
        if files.len() != ckpts.len() {
            return Err(Error::InvalidArgument(format!(
                "{} mask files for {} checkpoints",
                files.len(),
                ckpts.len()
            )));
        }
    }
    let base_side = Side::new(base, "base", &opts.name_map)?;
    let sides = ckpts
        .iter()
        .enumerate()
        .map(|(k, c)| Side::new(c, &format!("checkpoint {}", k + 1), &opts.name_map))
        .collect::<Result<Vec<_>>>()?;
    let selected: Option<BTreeSet<&str>> = opts
        .select
        .as_ref()
        .map(|v| v.iter().map(String::as_str).collect());
    let keep = |n: &str| selected.as_ref().is_none_or(|s| s.contains(n));

    // Each checkpoint must pair with the base as a diff would: mostly unpaired is an error.
    for side in &sides {
        let only = |x: &Side, y: &Side| -> Vec<String> {
            x.names
                .keys()
                .filter(|n| keep(n) && !y.contains(n))
                .cloned()
                .collect()
        };
        check_paired(
            &base_side,
            side,
            &keep,
            &only(&base_side, side),
            &only(side, &base_side),
        )?;
    }

    let mut tracks = Vec::new();
    let mut incomplete = Vec::new();
    let mut skipped = Vec::new();
    'names: for name in base_side.names.keys().filter(|n| keep(n)) {
        let Some(b) = base_side.get(name) else {
            continue;
        };
        if !b.1.dtype.is_float() {
            skipped.push(crate::diff::Skipped {
                name: name.clone(),
                reason: format!("not floating ({})", b.1.dtype),
            });
            continue;
        }
        let missing: Vec<usize> = (0..sides.len())
            .filter(|&k| !sides[k].contains(name))
            .collect();
        if !missing.is_empty() {
            incomplete.push((name.clone(), missing));
            continue;
        }
        let mut steps = Vec::with_capacity(sides.len());
        for side in &sides {
            let s = side.get(name).expect("present");
            let pair = Pair { name, a: b, b: s };
            let problem = mismatch(&pair).or_else(|| {
                (!s.1.dtype.is_float()).then(|| {
                    format!(
                        "dtype {} is not floating in {}",
                        s.1.dtype,
                        side.ckpt.path.display()
                    )
                })
            });
            if let Some(detail) = problem {
                if opts.skip_mismatched {
                    skipped.push(crate::diff::Skipped {
                        name: name.clone(),
                        reason: detail,
                    });
                    continue 'names;
                }
                return Err(Error::Mismatch {
                    tensor: name.clone(),
                    detail,
                });
            }
            steps.push(s);
        }
        tracks.push(Track {
            name,
            base: b,
            steps,
        });
    }
    if tracks.iter().all(|t| t.base.1.numel == 0) {
        return Err(Error::Pairing {
            reason: format!(
                "nothing to compare: no floating element is stored under the same name in {} and \
                 all {} checkpoints ({} tensors missing from some checkpoint, {} skipped{}); a \
                 sparsity over no elements would mean nothing",
                base.path.display(),
                ckpts.len(),
                incomplete.len(),
                skipped.len(),
                if selected.is_some() {
                    ", after include/exclude"
                } else {
                    ""
                }
            ),
        });
    }

    let k = ckpts.len();
    let total: u64 = tracks
        .iter()
        .map(|t| t.base.1.len as u64 + t.steps.iter().map(|s| s.1.len as u64).sum::<u64>())
        .sum();
    progress.total.store(total, Ordering::Relaxed);

    let mut writers = match &opts.mask_files {
        Some(specs) => {
            let entries: Vec<MaskEntry> = tracks
                .iter()
                .map(|t| MaskEntry {
                    name: t.name.to_string(),
                    shape: t.base.1.shape.clone(),
                    dtype: t.base.1.dtype.to_string(),
                    numel: t.base.1.numel,
                })
                .collect();
            specs
                .iter()
                .map(|spec| maskfile::create(&spec.path, &entries, &spec.provenance))
                .collect::<Result<Vec<U8FileWriter>>>()?
        }
        None => Vec::new(),
    };

    let partial = {
        // outs[j][i]: the slice of tensor i in checkpoint j's mask file.
        let mut outs: Vec<std::vec::IntoIter<&mut [u8]>> =
            writers.iter_mut().map(|w| w.slices().into_iter()).collect();
        let mut items = Vec::new();
        for (ti, t) in tracks.iter().enumerate() {
            let n = t.base.1.numel as usize;
            let mut chunks: Vec<std::slice::ChunksMut<u8>> = outs
                .iter_mut()
                .map(|o| {
                    o.next()
                        .expect("one slice per tensor")
                        .chunks_mut(CHUNK / 8)
                })
                .collect();
            for start in (0..n).step_by(CHUNK) {
                let words: Vec<&mut [u8]> = chunks
                    .iter_mut()
                    .map(|c| c.next().expect("chunk"))
                    .collect();
                items.push((ti, start, CHUNK.min(n - start), words));
            }
        }
        items
            .into_par_iter()
            .map(|(ti, start, len, mut words)| {
                if progress.cancel.load(Ordering::Relaxed) {
                    return Err(Error::Cancelled);
                }
                let t = &tracks[ti];
                let counts = compare_steps(&opts.criterion, t, start, len, &mut words, progress)?;
                Ok((ti, counts))
            })
            .collect::<Result<Vec<_>>>()?
    };
    // Nothing is reported, and no mask committed, from a file that changed under the pass.
    for t in &tracks {
        t.base.0.check_unchanged()?;
        for s in &t.steps {
            s.0.check_unchanged()?;
        }
    }
    for w in writers {
        w.finish()?;
    }

    let mut tensors: Vec<TensorTrajectory> = tracks
        .iter()
        .map(|t| TensorTrajectory {
            name: t.name.to_string(),
            dtype: t.base.1.dtype,
            shape: t.base.1.shape.clone(),
            numel: t.base.1.numel,
            changed_vs_base: vec![0; k],
            changed_consecutive: vec![0; k],
            outside_final: vec![0; k],
            ever: 0,
            last: 0,
        })
        .collect();
    for (ti, c) in partial {
        let out = &mut tensors[ti];
        for j in 0..k {
            out.changed_vs_base[j] += c.vs_base[j];
            out.changed_consecutive[j] += c.consecutive[j];
            out.outside_final[j] += c.outside_final[j];
        }
        out.ever += c.ever;
        out.last += c.last;
    }
    let mut renamed = vec![base_side.renamed];
    renamed.extend(sides.into_iter().map(|s| s.renamed));
    Ok(TrajectoryResult {
        tensors,
        incomplete,
        skipped,
        renamed,
    })
}

/// The counts of one chunk.
struct ChunkCounts {
    vs_base: Vec<u64>,
    consecutive: Vec<u64>,
    outside_final: Vec<u64>,
    ever: u64,
    last: u64,
}

/// Compares one chunk of one tensor in every checkpoint; writes each checkpoint's changed-bits
/// against the base into `words[j]` when mask files were asked for.
fn compare_steps<'a>(
    crit: &Criterion,
    t: &Track<'a>,
    start: usize,
    len: usize,
    words: &mut [&mut [u8]],
    progress: &Progress,
) -> Result<ChunkCounts> {
    let k = t.steps.len();
    let nbytes = len.div_ceil(64) * 8;
    let slice = |(shard, info): (&'a Shard, &'a TensorInfo)| -> &'a [u8] {
        let size = info.dtype.size();
        shard.prefetch(info, start * size, len * size);
        &shard.bytes(info)[start * size..(start + len) * size]
    };
    let base = slice(t.base);
    let steps: Vec<(&[u8], Dtype)> = t.steps.iter().map(|&s| (slice(s), s.1.dtype)).collect();
    let read = base.len() + steps.iter().map(|s| s.0.len()).sum::<usize>();
    // Changed-bits against the base, one chunk per checkpoint.
    let mut bits_k = vec![0u8; k * nbytes];
    let mut c = ChunkCounts {
        vs_base: vec![0; k],
        consecutive: vec![0; k],
        outside_final: vec![0; k],
        ever: 0,
        last: 0,
    };
    compare_run(
        crit,
        &mut Run {
            base: (base, t.base.1.dtype),
            steps: &steps,
            n: len,
            vs_base: &mut c.vs_base,
            consecutive: &mut c.consecutive,
            bits: &mut bits_k,
        },
    );
    t.base.0.check_faults()?;
    for s in &t.steps {
        s.0.check_faults()?;
    }
    // Set algebra on the chunk's bitsets, word by word (bits past `len` are zero).
    let word = |b: &[u8], w: usize| u64::from_le_bytes(b[8 * w..8 * w + 8].try_into().expect("8"));
    let last = &bits_k[(k - 1) * nbytes..];
    let mut ever = 0u64;
    for w in 0..nbytes / 8 {
        let fin = word(last, w);
        let mut any = 0u64;
        for (j, out) in c.outside_final.iter_mut().enumerate() {
            let x = word(&bits_k[j * nbytes..], w);
            any |= x;
            *out += (x & !fin).count_ones() as u64;
        }
        ever += any.count_ones() as u64;
    }
    for (j, out) in words.iter_mut().enumerate() {
        out.copy_from_slice(&bits_k[j * nbytes..(j + 1) * nbytes]);
    }
    c.ever = ever;
    c.last = c.vs_base[k - 1];
    progress.done.fetch_add(read as u64, Ordering::Relaxed);
    Ok(c)
}

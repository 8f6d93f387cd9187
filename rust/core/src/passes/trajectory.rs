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

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;

use crate::checkpoint::Checkpoint;
use crate::diff::{Progress, CHUNK};
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::fp8;
use crate::kernel::{compare_run, Criterion, Run};
use crate::maskfile::{self, MaskEntry, MaskFile};
use crate::plan::Selection;
use crate::plan::{plan, PlanOptions};
use crate::readahead;
use crate::safetensors::{check_all_unchanged, Shard, TensorInfo, U8FileWriter};
use crate::sides::{Side, Skipped};

/// What to compare and how.
#[derive(Debug, Clone)]
pub struct TrajectoryOptions {
    /// One threshold: `Absolute` with one tolerance, `Exact`, or `Relative`.
    pub criterion: Criterion,
    /// What pairs with what, every checkpoint against the base (selection, name map,
    /// mismatches, FP8 block sizes: `block_base` for the base, `block_tuned` for the run's
    /// checkpoints). A run compares whole tensors: `shared_rows` is not taken.
    pub plan: PlanOptions,
    /// One mask file per checkpoint (its changed-bits against the base), with provenance.
    pub mask_files: Option<Vec<crate::diff::MaskFileSpec>>,
}

/// What makes a trajectory one segment of a longer run (run segment by segment, on several
/// machines): the checkpoint before its first one, the run's final mask (so that
/// `outside_final` and `final` are the whole run's), and a file for the segment's `ever` bits
/// (the union over segments gives the run's). The default is a whole run.
#[derive(Debug, Default)]
pub struct Segment<'a> {
    /// The checkpoint before the first of this segment (the base when `None`).
    pub previous: Option<&'a Checkpoint>,
    /// The run's final mask: changed against the base in its last checkpoint.
    pub final_mask: Option<&'a MaskFile>,
    /// Where to write the elements changed against the base in any of this segment's
    /// checkpoints.
    pub ever_file: Option<crate::diff::MaskFileSpec>,
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
    pub skipped: Vec<Skipped>,
    /// Per checkpoint (base first): `(stored name, paired name)` of every rewritten name.
    pub renamed: Vec<Vec<(String, String)>>,
}

/// One tensor's location in the base and in each checkpoint.
struct Track<'a> {
    name: &'a str,
    base: (&'a Shard, &'a TensorInfo),
    steps: Vec<(&'a Shard, &'a TensorInfo)>,
    /// The tensor in the checkpoint before the first step (segments only).
    previous: Option<(&'a Shard, &'a TensorInfo)>,
    /// The run's final changed-bits of this tensor (segments only).
    final_bits: Option<&'a [u8]>,
    /// Scales of a scaled FP8 weight, per file.
    base_scale: Option<fp8::Scaled<'a>>,
    step_scales: Vec<Option<fp8::Scaled<'a>>>,
    previous_scale: Option<fp8::Scaled<'a>>,
}

/// The plan of a run: a track per tensor compared in every checkpoint, and what was left out.
struct RunPlan<'s> {
    tracks: Vec<Track<'s>>,
    /// (name, checkpoints missing it).
    incomplete: Vec<(String, Vec<usize>)>,
    skipped: Vec<Skipped>,
}

/// Plans every checkpoint (and, for a segment, the one before it) against the base as a diff
/// plans two ([`plan`]: the same pairing, refusals and scales), and keeps the tensors that pair
/// in all of them: the first stage of [`trajectory`].
fn plan_run<'s>(
    base: &Checkpoint,
    base_side: &'s Side<'s>,
    sides: &'s [Side<'s>],
    previous_side: Option<&'s Side<'s>>,
    opts: &TrajectoryOptions,
    segment: &Segment<'s>,
) -> Result<RunPlan<'s>> {
    if opts.plan.shared_rows {
        return Err(Error::InvalidArgument(
            "a trajectory compares whole tensors (no shared rows)".into(),
        ));
    }
    // One plan at a time (a plan holds a record per tensor: all of them at once would grow
    // with tensors x checkpoints), keeping per base name what the tracks need.
    type Found<'a> = ((&'a Shard, &'a TensorInfo), Option<fp8::Scaled<'a>>);
    let mut found: HashMap<&'s str, Vec<Found<'s>>> = HashMap::new();
    let mut previous: HashMap<&'s str, Found<'s>> = HashMap::new();
    let mut base_scales: HashMap<&'s str, Option<fp8::Scaled<'s>>> = HashMap::new();
    // Why a name was left out as mismatched (the first checkpoint's reason).
    let mut mismatched: HashMap<String, String> = HashMap::new();
    let mut scale_names = BTreeSet::new();
    let previous_side_iter = previous_side.into_iter().map(|s| (s, true));
    for (side, is_previous) in sides.iter().map(|s| (s, false)).chain(previous_side_iter) {
        let p = plan(base_side, side, &opts.plan)?;
        for (pair, &(a, b)) in p.pairs.iter().zip(&p.scaled) {
            base_scales.entry(pair.name).or_insert(a);
            if is_previous {
                previous.insert(pair.name, (pair.b, b));
            } else {
                found.entry(pair.name).or_default().push((pair.b, b));
            }
        }
        for x in p.skipped {
            mismatched.entry(x.name).or_insert(x.reason);
        }
        scale_names.extend(p.scale_names);
    }

    let selected = Selection::new(&opts.plan.select);
    let (mut tracks, mut incomplete, mut skipped) = (Vec::new(), Vec::new(), Vec::new());
    for name in base_side.names.keys().filter(|n| selected.keeps(n)) {
        let Some(b) = base_side.get(name) else {
            continue;
        };
        let reason = if scale_names.contains(name) {
            Some("scale of an FP8 weight (compared through its weight)".to_string())
        } else if !b.1.dtype.is_float() {
            Some(format!("not floating ({})", b.1.dtype))
        } else {
            None
        };
        if let Some(reason) = reason {
            skipped.push(Skipped {
                name: name.clone(),
                reason,
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
        // Mismatched in some checkpoint, when mismatches are skipped (else the plan refused).
        if let Some(reason) = mismatched.get(name) {
            skipped.push(Skipped {
                name: name.clone(),
                reason: reason.clone(),
            });
            continue;
        }
        let Some(steps) = found.get(name.as_str()).filter(|v| v.len() == sides.len()) else {
            skipped.push(Skipped {
                name: name.clone(),
                reason: "not paired in every checkpoint".into(),
            });
            continue;
        };
        let previous = match previous_side {
            None => None,
            Some(side) => {
                Some(
                    previous
                        .get(name.as_str())
                        .copied()
                        .ok_or_else(|| Error::Pairing {
                            reason: format!(
                        "tensor '{name}' of the base is missing from the previous checkpoint {}",
                        side.ckpt.path.display()
                    ),
                        })?,
                )
            }
        };
        let final_bits = match segment.final_mask {
            None => None,
            Some(m) => {
                let fits = m
                    .entries
                    .iter()
                    .any(|e| e.name == *name && e.numel == b.1.numel);
                let bits = m.packed(name).filter(|_| fits).ok_or_else(|| {
                    Error::mask(
                        &m.path,
                        Some(name),
                        format!("the final mask has no entry of {} elements", b.1.numel),
                    )
                })?;
                Some(bits)
            }
        };
        tracks.push(Track {
            name,
            base: b,
            steps: steps.iter().map(|&(t, _)| t).collect(),
            previous: previous.map(|(t, _)| t),
            final_bits,
            base_scale: base_scales.get(name.as_str()).copied().flatten(),
            step_scales: steps.iter().map(|&(_, q)| q).collect(),
            previous_scale: previous.and_then(|(_, q)| q),
        });
    }
    if tracks.iter().all(|t| t.base.1.numel == 0) {
        return Err(Error::Pairing {
            reason: format!(
                "nothing to compare: no floating element is stored under the same name in {} and \
                 all {} checkpoints ({} tensors missing from some checkpoint, {} skipped{}); a \
                 sparsity over no elements would mean nothing",
                base.path.display(),
                sides.len(),
                incomplete.len(),
                skipped.len(),
                if selected.is_active() {
                    ", after include/exclude"
                } else {
                    ""
                }
            ),
        });
    }
    Ok(RunPlan {
        tracks,
        incomplete,
        skipped,
    })
}

/// Compares every checkpoint of `ckpts` with `base` and with its predecessor, in one pass.
pub fn trajectory(
    base: &Checkpoint,
    ckpts: &[&Checkpoint],
    opts: &TrajectoryOptions,
    segment: &Segment,
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
    opts.criterion.check()?;
    if let Some(files) = &opts.mask_files {
        if files.len() != ckpts.len() {
            return Err(Error::InvalidArgument(format!(
                "{} mask files for {} checkpoints",
                files.len(),
                ckpts.len()
            )));
        }
    }
    let base_side = Side::new(base, "base", &opts.plan.name_map)?;
    let previous_side = segment
        .previous
        .map(|c| Side::new(c, "previous checkpoint", &opts.plan.name_map))
        .transpose()?;
    let sides = ckpts
        .iter()
        .enumerate()
        .map(|(k, c)| Side::new(c, &format!("checkpoint {}", k + 1), &opts.plan.name_map))
        .collect::<Result<Vec<_>>>()?;
    let RunPlan {
        tracks,
        incomplete,
        skipped,
    } = plan_run(
        base,
        &base_side,
        &sides,
        previous_side.as_ref(),
        opts,
        segment,
    )?;

    let k = ckpts.len();
    let total: u64 = tracks
        .iter()
        .map(|t| t.base.1.len as u64 + t.steps.iter().map(|s| s.1.len as u64).sum::<u64>())
        .sum();
    progress.total.store(total, Ordering::Relaxed);

    // One writer per checkpoint's mask, then one for the segment's ever bits.
    let entries: Vec<MaskEntry> = tracks
        .iter()
        .map(|t| MaskEntry {
            name: t.name.to_string(),
            shape: t.base.1.shape.clone(),
            dtype: t.base.1.dtype.to_string(),
            numel: t.base.1.numel,
        })
        .collect();
    let specs = opts.mask_files.iter().flatten().chain(&segment.ever_file);
    let mut writers = specs
        .map(|spec| maskfile::create(&spec.path, &entries, &spec.provenance))
        .collect::<Result<Vec<U8FileWriter>>>()?;
    let (n_masks, ever_out) = (
        opts.mask_files.as_ref().map_or(0, Vec::len),
        segment.ever_file.is_some(),
    );

    let partial = {
        // outs[j][i]: the slice of tensor i in checkpoint j's mask file.
        let mut outs: Vec<std::vec::IntoIter<&mut [u8]>> =
            writers.iter_mut().map(|w| w.slices().into_iter()).collect();
        // One work item per chunk of a tensor: (track, first element, elements, the slice of
        // each mask file's words it writes).
        type Item<'w> = (usize, usize, usize, Vec<&'w mut [u8]>);
        let mut items: Vec<Item> = Vec::new();
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
        // In file order of the base side, every checkpoint read ahead of the workers on a cold
        // cache and released behind them, as in a diff (`readahead`).
        let key = |&(ti, start, _, _): &Item| {
            let (shard, t) = tracks[ti].base;
            (shard.path.as_path(), t.offset + t.dtype.bytes(start))
        };
        items.sort_by(|x, y| key(x).cmp(&key(y)));
        let stretches = |&(ti, start, len, _): &Item| -> Vec<readahead::Stretch> {
            let t = &tracks[ti];
            std::iter::once(&t.base)
                .chain(&t.steps)
                .chain(&t.previous)
                .map(|&(shard, info)| readahead::Stretch {
                    shard,
                    offset: info.offset + info.dtype.bytes(start),
                    len: info.dtype.bytes(len),
                })
                .collect()
        };
        readahead::in_order(
            items,
            &progress.cancel,
            stretches,
            || (),
            |_, item| {
                progress.check()?;
                let (ti, start, len, mut words) = item;
                let t = &tracks[ti];
                let (masks, ever) = words.split_at_mut(n_masks);
                let ever = if ever_out { ever.first_mut() } else { None };
                let counts = compare_steps(&opts.criterion, t, start, len, masks, ever, progress)?;
                Ok((ti, counts))
            },
        )?
    };
    // Nothing is reported, and no mask committed, from a file that changed under the pass.
    check_all_unchanged(tracks.iter().flat_map(|t| {
        std::iter::once(t.base.0).chain(t.steps.iter().chain(&t.previous).map(|s| s.0))
    }))?;
    if let Some(m) = segment.final_mask {
        m.check_unchanged()?;
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
    ever_out: Option<&mut &mut [u8]>,
    progress: &Progress,
) -> Result<ChunkCounts> {
    let k = t.steps.len();
    let nbytes = len.div_ceil(64) * 8;
    let slice = |(shard, info): (&'a Shard, &'a TensorInfo)| -> &'a [u8] {
        let d = info.dtype;
        &shard.bytes(info)[d.bytes(start)..d.bytes(start + len)]
    };
    let base = slice(t.base);
    let steps: Vec<&[u8]> = t.steps.iter().map(|&s| slice(s)).collect();
    let previous = t.previous.map(slice);
    let read =
        base.len() + steps.iter().map(|s| s.len()).sum::<usize>() + previous.map_or(0, <[u8]>::len);
    // Scaled FP8 files: their dequantised values (or, under the exact criterion when every
    // file is scaled alike, codes and scales as stored), one buffer per file.
    let files = 1 + k + usize::from(previous.is_some());
    let scales: Vec<Option<fp8::Scaled>> = std::iter::once(t.base_scale)
        .chain(t.step_scales.iter().copied())
        .chain(t.previous.map(|_| t.previous_scale))
        .collect();
    let dtypes: Vec<Dtype> = std::iter::once(t.base.1.dtype)
        .chain(t.steps.iter().map(|s| s.1.dtype))
        .chain(t.previous.map(|p| p.1.dtype))
        .collect();
    let raws: Vec<&[u8]> = std::iter::once(base)
        .chain(steps.iter().copied())
        .chain(previous)
        .collect();
    let keys = matches!(crit, Criterion::Exact)
        && scales.iter().all(Option::is_some)
        && dtypes.iter().all(|&d| d == dtypes[0]);
    let buffers: Vec<Option<(Vec<u8>, Dtype)>> = (0..files)
        .map(|f| {
            scales[f].map(|s| {
                let width = if keys { 8 } else { 4 };
                let mut buf = vec![0u8; len * width];
                if keys {
                    fp8::stored_keys(raws[f], dtypes[f], start, &s, &mut buf);
                    (buf, Dtype::U64)
                } else {
                    fp8::dequantise(raws[f], dtypes[f], start, &s, &mut buf);
                    (buf, Dtype::F32)
                }
            })
        })
        .collect();
    let view = |f: usize| match &buffers[f] {
        Some((buf, d)) => (&buf[..], *d),
        None => (raws[f], dtypes[f]),
    };
    let base = view(0);
    let steps: Vec<(&[u8], Dtype)> = (1..=k).map(view).collect();
    let previous = t.previous.map(|_| view(k + 1));
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
            base,
            previous,
            steps: &steps,
            n: len,
            vs_base: &mut c.vs_base,
            consecutive: &mut c.consecutive,
            bits: &mut bits_k,
        },
    );
    t.base.0.check_faults()?;
    for s in t.steps.iter().chain(&t.previous) {
        s.0.check_faults()?;
    }
    // Set algebra on the chunk's bitsets, word by word (bits past `len` are zero). The final
    // bits are the run's when this is a segment, else this chunk's last checkpoint's.
    let word = |b: &[u8], w: usize| u64::from_le_bytes(b[8 * w..8 * w + 8].try_into().expect("8"));
    let last: &[u8] = match t.final_bits {
        Some(bits) => &bits[start / 8..start / 8 + nbytes],
        None => &bits_k[(k - 1) * nbytes..],
    };
    let tail = if len.is_multiple_of(64) {
        !0
    } else {
        (1u64 << (len % 64)) - 1
    };
    let (mut ever, mut fin_count) = (0u64, 0u64);
    let mut ever_bits = vec![0u8; if ever_out.is_some() { nbytes } else { 0 }];
    for w in 0..nbytes / 8 {
        let keep = if w + 1 == nbytes / 8 { tail } else { !0 };
        let fin = word(last, w) & keep;
        fin_count += fin.count_ones() as u64;
        let mut any = 0u64;
        for (j, out) in c.outside_final.iter_mut().enumerate() {
            let x = word(&bits_k[j * nbytes..], w);
            any |= x;
            *out += (x & !fin).count_ones() as u64;
        }
        ever += any.count_ones() as u64;
        if !ever_bits.is_empty() {
            ever_bits[8 * w..8 * w + 8].copy_from_slice(&any.to_le_bytes());
        }
    }
    for (j, out) in words.iter_mut().enumerate() {
        out.copy_from_slice(&bits_k[j * nbytes..(j + 1) * nbytes]);
    }
    if let Some(out) = ever_out {
        out.copy_from_slice(&ever_bits);
    }
    c.ever = ever;
    c.last = fin_count;
    progress.done.fetch_add(read as u64, Ordering::Relaxed);
    Ok(c)
}

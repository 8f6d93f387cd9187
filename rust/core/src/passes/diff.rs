//! Comparing two checkpoints' paired tensors (their [`crate::plan`]) in parallel, across and
//! within tensors.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::bits::padded_len;
use crate::checkpoint::Checkpoint;
use crate::dtype::{widen, Dtype};
use crate::error::{Error, Result};
use crate::fp8::{self, Layout};
use crate::kernel::{compare_chunk, Criterion, Hist, Job, BLOCK};
use crate::maskfile::{self, MaskEntry};
use crate::names;
use crate::plan::{plan, Plan, PlanOptions};
use crate::readahead;
use crate::safetensors::{check_all_unchanged, Shard, TensorInfo};
use crate::sample::{self, Drawn, SampleOptions};
use crate::sides::{Pair, Side, Sides, Skipped};

/// Elements per unit of parallel work (a multiple of the mask word width).
pub const CHUNK: usize = 1 << 18;
const _: () = assert!(CHUNK.is_multiple_of(BLOCK));

/// Shared between a running comparison and whoever watches it (another thread).
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes read so far, both checkpoints together.
    pub done: AtomicU64,
    /// Bytes the comparison will read, set once pairing is done.
    pub total: AtomicU64,
    /// Set to ask the comparison to stop; it then returns `Error::Cancelled`.
    pub cancel: AtomicBool,
}

impl Progress {
    /// `Err(Error::Cancelled)` once cancelling was asked for: called between pieces of work,
    /// and before anything is put in place, so that a cancelled command leaves no output.
    pub fn check(&self) -> Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(Error::Cancelled);
        }
        Ok(())
    }
}

/// What to compare and how.
#[derive(Debug, Clone)]
pub struct DiffOptions {
    pub criterion: Criterion,
    /// What pairs with what (selection, name map, mismatches, shared rows, FP8 block sizes).
    pub plan: PlanOptions,
    /// Emit the packed changed-bits of this threshold for every compared floating tensor (the
    /// subnetwork mask; integer tensors get none): into [`TensorDiff::bits`], or into
    /// `mask_file` when one is given.
    pub mask_at: Option<usize>,
    /// Write the mask straight into this `.rlmask` file (atomically, never held in memory).
    pub mask_file: Option<MaskFileSpec>,
    /// Also count elements and changed elements per binade of the base value (the magnitude
    /// lens, design §8), for every floating tensor, in the same pass.
    pub magnitude: bool,
    /// Compare every floating side stored wider than BF16 (F32, F16, F64) after rounding each
    /// value to BF16 (round to nearest, ties to even; F64 through F32, as torch converts), as
    /// an engine that loads the checkpoint in BF16 sees it. Scaled FP8 sides are unaffected.
    pub as_bf16: bool,
    /// Read a random sample of each tensor's blocks instead of every element (design §14):
    /// each tensor's [`TensorDiff::sample`] then says what was read, and its `changed` counts
    /// are the sample's.
    pub sample: Option<SampleOptions>,
}

impl DiffOptions {
    /// Every tensor, no name map, mismatches fatal, no mask.
    pub fn new(criterion: Criterion) -> DiffOptions {
        DiffOptions {
            criterion,
            plan: PlanOptions::default(),
            mask_at: None,
            mask_file: None,
            magnitude: false,
            as_bf16: false,
            sample: None,
        }
    }
}

/// Where and with what provenance a diff writes its mask file.
#[derive(Debug, Clone)]
pub struct MaskFileSpec {
    pub path: std::path::PathBuf,
    pub provenance: std::collections::BTreeMap<String, String>,
}

/// The comparison of one tensor.
#[derive(Debug, Clone)]
pub struct TensorDiff {
    pub name: String,
    pub base_dtype: Dtype,
    pub tuned_dtype: Dtype,
    pub shape: Vec<u64>,
    pub numel: u64,
    /// Both sides floating: compared by value and counted in the totals.
    pub floating: bool,
    /// Changed elements, one count per threshold.
    pub changed: Vec<u64>,
    /// Packed changed-bits when a mask was asked for: LSB-first, padded to whole u64 words
    /// ([`crate::bits::padded_len`] bytes), as stored in `.rlmask` files.
    pub bits: Option<Vec<u8>>,
    /// Per binade of the base value, when the magnitude lens was asked for (floating only).
    pub by_magnitude: Option<Hist>,
    /// What a sampled diff read of this tensor (`changed` then counts the sample's changes).
    pub sample: Option<TensorSample>,
}

/// What a sampled diff read of one tensor: the blocks (its stratum's sample) and, per
/// threshold, the sum of the squared changed counts of the blocks (with `changed`, their
/// sum, the block totals' variance follows).
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSample {
    /// Elements read, and the bytes they take in both checkpoints.
    pub elements: u64,
    pub bytes: u64,
    /// Blocks read, and blocks the tensor has.
    pub blocks: u64,
    pub total_blocks: u64,
    /// Elements per block (the last block of a tensor may be short).
    pub block: u64,
    /// Per threshold: the sum over the blocks read of (changed in the block)^2.
    pub sum_sq: Vec<f64>,
}

/// Everything a comparison found.
#[derive(Debug, Clone)]
pub struct DiffResult {
    /// Every compared pair, in natural name order ([`names::natural_cmp`]).
    pub tensors: Vec<TensorDiff>,
    pub only_in_base: Vec<String>,
    pub only_in_tuned: Vec<String>,
    /// Names absent from a checkpoint because its weights are tied (`lm_head.weight` with
    /// `model.embed_tokens.weight` present).
    pub tied: Vec<String>,
    pub skipped: Vec<Skipped>,
    /// The FP8 weights compared as their dequantised values, with each side's scale layout
    /// (`None`: that side is stored unscaled, e.g. a BF16 export against an FP8 release).
    pub dequantised: Vec<(String, Option<Layout>, Option<Layout>)>,
    /// The scale tensors (weight and activation scales of scaled FP8 weights): compared and
    /// listed with their changed scales, but not counted as weights (`floating` is false).
    pub scales: Vec<String>,
    /// `(name, base rows, tuned rows)` of the tensors compared on the rows both share
    /// ([`crate::plan::PlanOptions::shared_rows`]); their extra rows are not compared.
    pub resized: Vec<(String, u64, u64)>,
    /// `(stored name, name paired as)` for every name that wrapper stripping or the name map
    /// rewrote, per side.
    pub renamed_base: Vec<(String, String)>,
    pub renamed_tuned: Vec<(String, String)>,
}

fn validate(opts: &DiffOptions) -> Result<()> {
    opts.criterion.check()?;
    let n = opts.criterion.thresholds();
    if opts.mask_file.is_some() && opts.mask_at.is_none() {
        return Err(Error::InvalidArgument(
            "a mask file needs mask_at (the threshold whose bits are kept)".into(),
        ));
    }
    if let Some(k) = opts.mask_at {
        if k >= n {
            return Err(Error::InvalidArgument(format!(
                "mask_at {k} is out of range for {n} thresholds"
            )));
        }
    }
    if let Some(sample) = &opts.sample {
        sample.check()?;
        if opts.mask_at.is_some() || opts.magnitude {
            return Err(Error::InvalidArgument(
                "a sampled diff estimates counts; a mask or the magnitude lens needs every \
                 element (drop the sample)"
                    .into(),
            ));
        }
    }
    Ok(())
}

/// Compares every tensor the two checkpoints share, in one pass over their data.
pub fn diff(
    base: &Checkpoint,
    tuned: &Checkpoint,
    opts: &DiffOptions,
    progress: &Progress,
) -> Result<DiffResult> {
    validate(opts)?;
    let base_side = Side::new(base, "base", &opts.plan.name_map)?;
    let tuned_side = Side::new(tuned, "tuned", &opts.plan.name_map)?;
    let Plan {
        pairs,
        only_in_base,
        only_in_tuned,
        tied,
        skipped,
        resized,
        floating,
        scaled,
        dequantised,
        scales: scale_names,
        ..
    } = plan(&base_side, &tuned_side, &opts.plan)?;
    let nthr = opts.criterion.thresholds();
    // Mask bits go straight into a mapped mask file, or into memory, or nowhere.
    let mut writer = match &opts.mask_file {
        Some(spec) => {
            let entries: Vec<MaskEntry> = pairs
                .iter()
                .zip(&floating)
                .filter(|(_, &f)| f)
                .map(|(p, _)| MaskEntry {
                    name: p.name.to_string(),
                    shape: p.shape(),
                    dtype: p.a.1.dtype.to_string(),
                    numel: p.numel(),
                })
                .collect();
            Some(maskfile::create(&spec.path, &entries, &spec.provenance)?)
        }
        None => None,
    };
    // A sample's blocks per pair (None: every element).
    let block = opts
        .sample
        .map(|s| s.block_size(pairs.iter().map(Pair::numel).sum()));
    let drawn: Vec<Option<Drawn>> = pairs
        .iter()
        .map(|p| {
            Some(sample::draw(
                opts.sample.as_ref()?,
                p.name,
                p.numel() as usize,
                block?,
            ))
        })
        .collect();
    let in_memory = opts.mask_at.is_some() && writer.is_none();
    let mut bits: Vec<Option<Vec<u8>>> = pairs
        .iter()
        .zip(&floating)
        .map(|(p, &f)| (in_memory && f).then(|| vec![0u8; padded_len(p.numel() as usize)]))
        .collect();
    let total: u64 = pairs
        .iter()
        .zip(&drawn)
        .map(|(p, d)| {
            let n = match (d, block) {
                (Some(d), Some(b)) => (d.starts.len() * b).min(p.numel() as usize),
                _ => p.numel() as usize,
            };
            (p.a.1.dtype.bytes(n) + p.b.1.dtype.bytes(n)) as u64
        })
        .sum();
    progress.total.store(total, Ordering::Relaxed);

    let partial = {
        let mut file_slices = writer.as_mut().map(|w| w.slices().into_iter());
        let outs: Vec<Option<&mut [u8]>> = bits
            .iter_mut()
            .zip(&floating)
            .map(|(mem, &f)| match file_slices.as_mut() {
                Some(slices) if f => slices.next(),
                _ => mem.as_deref_mut(),
            })
            .collect();
        // A sample reads scattered blocks: no read-ahead around them while it runs.
        let mut shards: Vec<&Shard> = match opts.sample {
            Some(_) => pairs.iter().flat_map(|p| [p.a.0, p.b.0]).collect(),
            None => Vec::new(),
        };
        shards.sort_by_key(|s| std::ptr::from_ref(*s) as usize);
        shards.dedup_by_key(|s| std::ptr::from_ref(*s) as usize);
        shards.iter().for_each(|s| s.set_sequential(false));
        let ranges = Ranges {
            drawn: &drawn,
            block: block.unwrap_or(CHUNK),
        };
        let partial = compare_pairs(&pairs, &floating, &scaled, outs, ranges, opts, progress);
        shards.iter().for_each(|s| s.set_sequential(true));
        partial?
    };
    // Nothing is reported, and no mask committed, from a file that changed under the pass.
    check_all_unchanged(pairs.iter().flat_map(|p| [p.a.0, p.b.0]))?;
    if let Some(w) = writer {
        w.finish()?;
    }

    let mut changed = vec![vec![0u64; nthr]; pairs.len()];
    let mut hists: Vec<Option<Hist>> = vec![None; pairs.len()];
    let mut samples: Vec<Option<TensorSample>> = pairs
        .iter()
        .zip(&drawn)
        .map(|(p, d)| {
            let (d, block) = (d.as_ref()?, block? as u64);
            let n = p.numel();
            let elements: u64 = d.starts.iter().map(|&s| block.min(n - s as u64)).sum();
            let side = |t: &TensorInfo| t.dtype.bytes(elements as usize) as u64;
            Some(TensorSample {
                elements,
                bytes: side(p.a.1) + side(p.b.1),
                blocks: d.starts.len() as u64,
                total_blocks: d.blocks,
                block,
                sum_sq: vec![0.0; nthr],
            })
        })
        .collect();
    for (pi, counts, hist) in partial {
        if let Some(s) = samples[pi].as_mut() {
            // In a sample every work item is one block.
            for (acc, &c) in s.sum_sq.iter_mut().zip(&counts) {
                *acc += (c as f64) * (c as f64);
            }
        }
        for (acc, c) in changed[pi].iter_mut().zip(counts) {
            *acc += c;
        }
        if let Some(h) = hist {
            hists[pi].get_or_insert_with(|| Hist::new(nthr)).add(&h);
        }
    }
    let mut tensors: Vec<TensorDiff> = pairs
        .iter()
        .zip(&floating)
        .zip(changed)
        .zip(bits)
        .zip(hists)
        .zip(samples)
        .map(
            |(((((p, &floating), changed), bits), by_magnitude), sample)| TensorDiff {
                name: p.name.to_string(),
                base_dtype: p.a.1.dtype,
                tuned_dtype: p.b.1.dtype,
                shape: p.shape(),
                numel: p.numel(),
                floating,
                changed,
                bits,
                by_magnitude,
                sample,
            },
        )
        .collect();
    // In natural order (`layers.2` before `layers.10`), as every report shows them: sorted
    // here, a million names take a tenth of the time Python's sort by key would.
    tensors.sort_by(|x, y| names::natural_cmp(&x.name, &y.name));
    Ok(DiffResult {
        tensors,
        only_in_base,
        only_in_tuned,
        tied,
        skipped,
        dequantised,
        scales: scale_names,
        resized,
        renamed_base: base_side.renamed,
        renamed_tuned: tuned_side.renamed,
    })
}

/// Elements of a scaled FP8 stretch dequantised and compared at a time: small enough that the
/// dequantised values (4 or 8 bytes each, both sides) stay in cache until they are compared.
const STRETCH: usize = 1024;
const _: () = assert!(STRETCH.is_multiple_of(BLOCK) && CHUNK.is_multiple_of(STRETCH));

/// How one side of a scaled stretch reaches the kernel.
#[derive(Clone, Copy)]
enum Prepared {
    /// As stored (an unscaled side).
    Stored,
    /// The codes as stored, with one scale per block of 64 ([`Stretch::scales`]).
    Fused,
    /// Values (or, for the exact criterion, keys) of this dtype in the first bytes of
    /// [`Stretch::buffer`].
    Buffered(Dtype, usize),
}

/// A worker's reusable buffers for one side of scaled stretches: they grow to the largest
/// stretch once (a fresh megabyte per chunk would cost its page faults every time).
#[derive(Default)]
struct Stretch {
    buffer: Vec<u8>,
    scales: Vec<f32>,
}

impl Stretch {
    /// Prepares `raw` (elements `first..` of a weight scaled as `q`, if it is) for the kernel:
    /// codes and block scales where every block of 64 has one scale, else dequantised
    /// values, or codes and scales as stored (`keys`, the exact criterion).
    fn prepare(
        &mut self,
        q: Option<fp8::Scaled>,
        raw: &[u8],
        d: Dtype,
        first: usize,
        keys: bool,
        round: bool,
    ) -> Prepared {
        let Some(s) = q else {
            if round {
                return self.round_bf16(raw, d);
            }
            return Prepared::Stored;
        };
        let n = if d == Dtype::F4 {
            2 * raw.len()
        } else {
            raw.len() / d.size()
        };
        if !keys && d.is_fp8() && fp8::block_scales(n, first, &s, &mut self.scales) {
            return Prepared::Fused;
        }
        let width = if keys { 8 } else { 4 };
        if self.buffer.len() < n * width {
            self.buffer.resize(n * width, 0);
        }
        let out = &mut self.buffer[..n * width];
        if keys {
            fp8::stored_keys(raw, d, first, &s, out);
            Prepared::Buffered(Dtype::U64, n * 8)
        } else {
            fp8::dequantise(raw, d, first, &s, out);
            Prepared::Buffered(Dtype::F32, n * 4)
        }
    }

    /// The bytes, dtype and block scales the kernel reads for a prepared side.
    /// `raw` (F32, F16 or F64 values) rounded to BF16 in [`Stretch::buffer`].
    fn round_bf16(&mut self, raw: &[u8], d: Dtype) -> Prepared {
        let n = raw.len() / d.size();
        if self.buffer.len() < n * 2 {
            self.buffer.resize(n * 2, 0);
        }
        let out = self.buffer[..n * 2].chunks_exact_mut(2);
        match d {
            Dtype::F32 => {
                for (o, c) in out.zip(raw.chunks_exact(4)) {
                    let x = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    o.copy_from_slice(&widen::f32_to_bf16(x).to_le_bytes());
                }
            }
            Dtype::F16 => {
                let t = widen::f16_table();
                for (o, c) in out.zip(raw.chunks_exact(2)) {
                    let x = t[u16::from_le_bytes([c[0], c[1]]) as usize];
                    o.copy_from_slice(&widen::f32_to_bf16(x).to_le_bytes());
                }
            }
            Dtype::F64 => {
                for (o, c) in out.zip(raw.chunks_exact(8)) {
                    let x = f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32;
                    o.copy_from_slice(&widen::f32_to_bf16(x.to_bits()).to_le_bytes());
                }
            }
            _ => unreachable!("only F32, F16 and F64 sides are rounded"),
        }
        Prepared::Buffered(Dtype::BF16, n * 2)
    }

    fn view<'a>(
        &'a self,
        p: Prepared,
        raw: &'a [u8],
        d: Dtype,
    ) -> (&'a [u8], Dtype, Option<&'a [f32]>) {
        match p {
            Prepared::Stored => (raw, d, None),
            Prepared::Fused => (raw, d, Some(&self.scales)),
            Prepared::Buffered(dtype, len) => (&self.buffer[..len], dtype, None),
        }
    }
}

/// What a pass reads of each pair: every chunk, or a sample's blocks of `block` elements.
#[derive(Clone, Copy)]
struct Ranges<'d> {
    drawn: &'d [Option<Drawn>],
    block: usize,
}

/// What one chunk of one pair gives: the pair, its changed counts per threshold, and its
/// binade counts when the magnitude lens was asked for.
type ChunkResult = (usize, Vec<u64>, Option<Hist>);

/// Compares every pair, in parallel over chunks of every tensor, writing mask bits into
/// `outs[i]` (when given) for pair `i`; returns (pair, counts, binade counts when asked for)
/// per chunk.
fn compare_pairs<'a>(
    pairs: &[Pair<'a>],
    floating: &[bool],
    scaled: &[Sides],
    outs: Vec<Option<&mut [u8]>>,
    ranges: Ranges,
    opts: &DiffOptions,
    progress: &Progress,
) -> Result<Vec<ChunkResult>> {
    let nthr = opts.criterion.thresholds();
    // One work item per chunk of a tensor, each owning the slice of mask words it writes.
    struct Item<'a> {
        pair: usize,
        start: usize,
        len: usize,
        words: Option<&'a mut [u8]>,
    }
    let mut items = Vec::new();
    for (pi, (p, words)) in pairs.iter().zip(outs).enumerate() {
        let n = p.numel() as usize;
        if let Some(d) = &ranges.drawn[pi] {
            // A sample: one item per block drawn (no mask words: validated).
            for &start in &d.starts {
                items.push(Item {
                    pair: pi,
                    start,
                    len: ranges.block.min(n - start),
                    words: None,
                });
            }
            continue;
        }
        let mut words = words.map(|w| w.chunks_mut(CHUNK / 8));
        for start in (0..n).step_by(CHUNK) {
            items.push(Item {
                pair: pi,
                start,
                len: CHUNK.min(n - start),
                words: words.as_mut().and_then(|w| w.next()),
            });
        }
    }

    // In file order of the base side, so that a cold pass reads each file front to back.
    items.sort_by(|x, y| {
        let key = |it: &Item| {
            let (shard, t) = pairs[it.pair].a;
            (shard.path.as_path(), t.offset + t.dtype.bytes(it.start))
        };
        key(x).cmp(&key(y))
    });
    let exact = Criterion::Exact;
    let stretch = |item: &Item| {
        let p = &pairs[item.pair];
        let side = |(shard, t): (&'a Shard, &'a TensorInfo)| {
            let at = |n| t.dtype.bytes(n);
            readahead::Stretch {
                shard,
                offset: t.offset + at(item.start),
                len: at(item.len),
            }
        };
        vec![side(p.a), side(p.b)]
    };
    readahead::in_order(
        items,
        &progress.cancel,
        stretch,
        // Each worker reuses its buffers for dequantised FP8 stretches (a fresh megabyte per
        // chunk would cost its page faults every time).
        || (Stretch::default(), Stretch::default()),
        |state: &mut (Stretch, Stretch), item| {
            progress.check()?;
            let p = &pairs[item.pair];

            let (ta, tb) = (p.a.1, p.b.1);
            let (da, db) = (ta.dtype, tb.dtype);
            let (end, first) = (item.start + item.len, item.start);
            let raw_a = &p.a.0.bytes(ta)[da.bytes(first)..da.bytes(end)];
            let raw_b = &p.b.0.bytes(tb)[db.bytes(first)..db.bytes(end)];
            let floating = floating[item.pair];
            let crit = if floating { &opts.criterion } else { &exact };
            // Sides rounded to BF16 before the comparison (`as_bf16`).
            let round = |d: Dtype| {
                opts.as_bf16 && floating && matches!(d, Dtype::F32 | Dtype::F16 | Dtype::F64)
            };
            // Scaled FP8 weights: this stretch's dequantised values, or under the exact
            // criterion (both sides scaled alike) codes and scales as stored.
            let (qa, qb) = scaled[item.pair];
            let keys = matches!(opts.criterion, Criterion::Exact)
                && qa.is_some()
                && qb.is_some()
                && ta.dtype == tb.dtype;
            let mut counts = vec![0u64; nthr];
            let mut hist = (floating && opts.magnitude && !keys).then(|| Hist::new(nthr));
            if !floating {
                // Integer tensors (and scales) have one bitwise count, reported under every
                // threshold.
                let job = Job::new(raw_a, ta.dtype, raw_b, tb.dtype, item.len);
                let mut one = [0u64];
                compare_chunk(crit, &job, &mut one, None, None);
                counts.fill(one[0]);
            } else if qa.is_none() && qb.is_none() && !(round(ta.dtype) || round(tb.dtype)) {
                let job = Job::new(raw_a, ta.dtype, raw_b, tb.dtype, item.len);
                let bits = item.words.zip(opts.mask_at);
                compare_chunk(crit, &job, &mut counts, bits, hist.as_mut());
            } else {
                // A scaled side is dequantised (or keyed) a cache-sized stretch at a time,
                // each stretch compared while it is still in cache.
                let (side_a, side_b) = state;
                let mut words = item.words;
                for off in (0..item.len).step_by(STRETCH) {
                    let n = STRETCH.min(item.len - off);
                    let ra = &raw_a[da.bytes(off)..da.bytes(off + n)];
                    let rb = &raw_b[db.bytes(off)..db.bytes(off + n)];
                    let first = item.start + off;
                    let pa = side_a.prepare(qa, ra, ta.dtype, first, keys, round(ta.dtype));
                    let pb = side_b.prepare(qb, rb, tb.dtype, first, keys, round(tb.dtype));
                    let (a, da, fa) = side_a.view(pa, ra, ta.dtype);
                    let (b, db, fb) = side_b.view(pb, rb, tb.dtype);
                    let job = Job {
                        a,
                        b,
                        da,
                        db,
                        n,
                        fa,
                        fb,
                    };
                    let bits = words
                        .as_deref_mut()
                        .map(|w| {
                            let end = (off / 8 + n.div_ceil(64) * 8).min(w.len());
                            &mut w[off / 8..end]
                        })
                        .zip(opts.mask_at);
                    compare_chunk(crit, &job, &mut counts, bits, hist.as_mut());
                }
            }
            progress
                .done
                .fetch_add((raw_a.len() + raw_b.len()) as u64, Ordering::Relaxed);
            // A read of a truncated file returned zeros: these counts must not be reported,
            // and the pass stops here.
            p.a.0.check_faults()?;
            p.b.0.check_faults()?;
            Ok((item.pair, counts, hist))
        },
    )
}

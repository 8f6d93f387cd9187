//! The plan of a pass over two checkpoints (issue 28): which tensors pair (names as paired
//! after wrapper segments are removed and the name map applied), which are one-sided, tied,
//! skipped or resized, which are scaled weights and which are their scales, and the refusals
//! of a comparison over nothing or over mostly unpaired models. Every pass over a pair of
//! checkpoints starts from it, and the binding hands it to Python (`rank`).

use std::collections::BTreeSet;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::fp8::{self, Layout};
use crate::safetensors::TensorInfo;
use crate::sides::{shared_rows, Pair, Side, Sides, Skipped};

/// Share of one side's floating elements that may lack a partner before the comparison is
/// refused as mostly unpaired.
pub const MAX_UNPAIRED: f64 = 0.5;

pub(crate) const TIED: [(&str, &str); 1] = [("lm_head.weight", "model.embed_tokens.weight")];

/// What pairs with what: the options every pass over two checkpoints shares.
#[derive(Debug, Clone, Default)]
pub struct PlanOptions {
    /// Only these names (as paired) are considered on either side (all when `None`).
    pub select: Option<Vec<String>>,
    /// Prefix translations applied to both sides' names after wrapper segments are removed.
    pub name_map: Vec<(String, String)>,
    /// List tensors whose shapes or dtypes cannot be compared instead of failing.
    pub skip_mismatched: bool,
    /// Compare tensors whose shapes differ in the number of rows only on the rows both share.
    pub shared_rows: bool,
    /// Block size of each side's block-scaled FP8 weights, when declared or given.
    pub block_base: Option<[u64; 2]>,
    pub block_tuned: Option<[u64; 2]>,
}

/// The names a pass considers: those of `select` (as paired), or every name.
pub(crate) struct Selection<'o>(Option<BTreeSet<&'o str>>);

impl<'o> Selection<'o> {
    pub(crate) fn new(select: &'o Option<Vec<String>>) -> Selection<'o> {
        Selection(
            select
                .as_ref()
                .map(|v| v.iter().map(String::as_str).collect()),
        )
    }

    /// Whether the pass considers `name`.
    pub(crate) fn keeps(&self, name: &str) -> bool {
        self.0.as_ref().is_none_or(|s| s.contains(name))
    }

    /// Whether a selection was given (for messages: "after include/exclude").
    pub(crate) fn is_active(&self) -> bool {
        self.0.is_some()
    }
}

/// The plan: pairs in name order, and everything left out with the reason.
pub(crate) struct Plan<'s> {
    pub(crate) pairs: Vec<Pair<'s>>,
    pub(crate) only_in_base: Vec<String>,
    pub(crate) only_in_tuned: Vec<String>,
    pub(crate) tied: Vec<String>,
    pub(crate) skipped: Vec<Skipped>,
    pub(crate) resized: Vec<(String, u64, u64)>,
    /// Per pair: both sides floating and not a scale (counted by value).
    pub(crate) floating: Vec<bool>,
    /// Per pair: each side's scale, when it is a scaled (FP8 or MXFP4) weight.
    pub(crate) scaled: Vec<Sides<'s>>,
    pub(crate) dequantised: Vec<(String, Option<Layout>, Option<Layout>)>,
    /// The scale tensors among the pairs: compared, not counted.
    pub(crate) scales: Vec<String>,
    /// Every scale tensor of either side, paired or not.
    pub(crate) scale_names: BTreeSet<String>,
}

/// The plan of a comparison of `base_side` against `tuned_side`.
pub(crate) fn plan<'s>(
    base_side: &'s Side<'s>,
    tuned_side: &'s Side<'s>,
    opts: &PlanOptions,
) -> Result<Plan<'s>> {
    let selected = Selection::new(&opts.select);
    let keep = |n: &str| selected.keeps(n);

    // Tied: both sides store the embeddings and neither an output head of its own. A head
    // missing on one side only is a one-sided name like any other.
    let mut tied = Vec::new();
    for (head, embed) in TIED {
        let absent_tied = |c: &Side| !c.contains(head) && c.contains(embed);
        if keep(head) && absent_tied(base_side) && absent_tied(tuned_side) {
            tied.push(head.to_string());
        }
    }
    // Scales are a property of values: sides read as stored bytes (patches) have none.
    let scales_of = |side: &'s Side<'s>, block| -> Result<fp8::Scales<'s>> {
        if !side.values {
            return Ok(fp8::Scales::default());
        }
        fp8::find(&side.names, &keep, |n| side.get(n), block)
    };
    let scales_a = scales_of(base_side, opts.block_base)?;
    let scales_b = scales_of(tuned_side, opts.block_tuned)?;
    let is_scale = |n: &str| scales_a.names.contains(n) || scales_b.names.contains(n);
    // A scale on one side only (FP8 against its BF16 export) is part of its weight's
    // dequantisation, not a one-sided tensor.
    let only = |x: &Side, y: &Side| -> Vec<String> {
        x.names
            .keys()
            .filter(|n| keep(n) && !y.contains(n) && !is_scale(n))
            .cloned()
            .collect()
    };
    let only_in_base = only(base_side, tuned_side);
    let only_in_tuned = only(tuned_side, base_side);
    check_paired(base_side, tuned_side, &keep, &only_in_base, &only_in_tuned)?;

    let mut pairs = Vec::new();
    let mut skipped = Vec::new();
    let mut resized = Vec::new();
    for name in base_side.names.keys().filter(|n| keep(n)) {
        let (Some(a), Some(b)) = (base_side.get(name), tuned_side.get(name)) else {
            continue;
        };
        let mut p = Pair {
            name,
            a,
            b,
            rows: None,
        };
        if opts.shared_rows {
            p.rows = shared_rows(a.1, b.1);
            if let Some(r) = p.rows {
                resized.push((name.to_string(), a.1.shape[0], b.1.shape[0]));
                // The dtypes must still agree; the shapes do on the shared rows.
                let cut = |t: &TensorInfo| TensorInfo {
                    shape: {
                        let mut s = t.shape.clone();
                        s[0] = r;
                        s
                    },
                    ..t.clone()
                };
                let (ca, cb) = (cut(a.1), cut(b.1));
                let check = Pair {
                    name,
                    a: (a.0, &ca),
                    b: (b.0, &cb),
                    rows: None,
                };
                if let Some(detail) = mismatch(&check) {
                    resized.pop();
                    if opts.skip_mismatched {
                        skipped.push(Skipped {
                            name: name.to_string(),
                            reason: detail,
                        });
                        continue;
                    }
                    return Err(Error::Mismatch {
                        tensor: name.to_string(),
                        detail,
                    });
                }
                pairs.push(p);
                continue;
            }
        }
        match mismatch(&p) {
            None => pairs.push(p),
            Some(reason) if opts.skip_mismatched => skipped.push(Skipped {
                name: name.to_string(),
                reason,
            }),
            Some(detail) => {
                return Err(Error::Mismatch {
                    tensor: name.to_string(),
                    detail,
                })
            }
        }
    }
    let compared: u64 = pairs
        .iter()
        .filter(|p| p.a.1.dtype.is_float() && p.b.1.dtype.is_float())
        .map(Pair::numel)
        .sum();
    // Values compared over nothing mean nothing; bytes copied (patches) refuse empty
    // checkpoints themselves.
    if compared == 0 && base_side.values {
        return Err(Error::Pairing {
            reason: format!(
                "nothing to compare: no floating element is stored under the same name in both \
                 {} and {} ({} tensors paired, {} skipped as mismatched{}); a sparsity over no \
                 elements would mean nothing",
                base_side.ckpt.path.display(),
                tuned_side.ckpt.path.display(),
                pairs.len(),
                skipped.len(),
                if selected.is_active() {
                    ", after include/exclude"
                } else {
                    ""
                }
            ),
        });
    }

    // Weights counted by value; scale tensors are compared but not counted.
    let floating: Vec<bool> = pairs
        .iter()
        .map(|p| p.a.1.dtype.is_float() && p.b.1.dtype.is_float() && !is_scale(p.name))
        .collect();
    let scaled: Vec<Sides> = pairs
        .iter()
        .map(|p| {
            (
                scales_a.of.get(p.name).map(|(_, q)| *q),
                scales_b.of.get(p.name).map(|(_, q)| *q),
            )
        })
        .collect();
    let dequantised = pairs
        .iter()
        .zip(&scaled)
        .filter(|(_, (a, b))| a.is_some() || b.is_some())
        .map(|(p, (a, b))| (p.name.to_string(), a.map(|q| q.layout), b.map(|q| q.layout)))
        .collect();
    let scale_names = pairs
        .iter()
        .filter(|p| is_scale(p.name))
        .map(|p| p.name.to_string())
        .collect();
    Ok(Plan {
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
        scale_names: scales_a.names.into_iter().chain(scales_b.names).collect(),
    })
}

/// One pair of the plan as the binding hands it out (in natural name order): the name as paired, each side's stored
/// name, the rows compared (`None`: all), and whether it is counted by value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedPair {
    pub name: String,
    pub base: String,
    pub tuned: String,
    pub rows: Option<u64>,
    pub floating: bool,
}

/// The plan, owned: what Python passes (`rank`) pair by.
#[derive(Debug, Clone)]
pub struct Pairing {
    pub pairs: Vec<PlannedPair>,
    pub only_in_base: Vec<String>,
    pub only_in_tuned: Vec<String>,
    pub tied: Vec<String>,
    pub skipped: Vec<Skipped>,
    pub resized: Vec<(String, u64, u64)>,
    pub renamed_base: Vec<(String, String)>,
    pub renamed_tuned: Vec<(String, String)>,
}

/// Pairs two checkpoints as every pass does (the crate-private `plan`, owned).
pub fn pairing(base: &Checkpoint, tuned: &Checkpoint, opts: &PlanOptions) -> Result<Pairing> {
    let base_side = Side::new(base, "base", &opts.name_map)?;
    let tuned_side = Side::new(tuned, "tuned", &opts.name_map)?;
    let p = plan(&base_side, &tuned_side, opts)?;
    let stored = |side: &Side, name: &str| {
        side.names
            .get(name)
            .map_or_else(|| name.to_string(), |s| s.to_string())
    };
    let mut pairs: Vec<PlannedPair> = p
        .pairs
        .iter()
        .zip(&p.floating)
        .map(|(pair, &floating)| PlannedPair {
            name: pair.name.to_string(),
            base: stored(&base_side, pair.name),
            tuned: stored(&tuned_side, pair.name),
            rows: pair.rows,
            floating,
        })
        .collect();
    // In natural order (`layers.2` before `layers.10`), as every report shows them.
    pairs.sort_by(|x, y| crate::names::natural_cmp(&x.name, &y.name));
    Ok(Pairing {
        pairs,
        only_in_base: p.only_in_base,
        only_in_tuned: p.only_in_tuned,
        tied: p.tied,
        skipped: p.skipped,
        resized: p.resized,
        renamed_base: base_side.renamed.clone(),
        renamed_tuned: tuned_side.renamed.clone(),
    })
}

/// Refuses a comparison in which more than [`MAX_UNPAIRED`] of either side's floating
/// elements have no partner: its figures would describe a small, arbitrary part of the model.
pub(crate) fn check_paired(
    base: &Side,
    tuned: &Side,
    keep: &dyn Fn(&str) -> bool,
    only_in_base: &[String],
    only_in_tuned: &[String],
) -> Result<()> {
    for (what, side, only) in [
        ("base", base, only_in_base),
        ("tuned", tuned, only_in_tuned),
    ] {
        let all = side.floating_numel(side.names.keys().filter(|n| keep(n)));
        let unpaired = side.floating_numel(only.iter());
        if all > 0 && unpaired as f64 > MAX_UNPAIRED * all as f64 {
            let floating: Vec<&str> = only
                .iter()
                .filter(|n| side.get(n).is_some_and(|(_, t)| t.dtype.is_float()))
                .map(String::as_str)
                .collect();
            let few = floating
                .iter()
                .take(3)
                .copied()
                .collect::<Vec<_>>()
                .join("', '");
            return Err(Error::Pairing {
                reason: format!(
                    "{unpaired} of the {all} floating elements of {what} ({}) have no tensor of \
                     the same name on the other side ({} tensors, e.g. '{few}'); these are not \
                     two versions of one model, or their names differ: select what they share \
                     with include (--include) or translate names with name_map (--name-map)",
                    side.ckpt.path.display(),
                    floating.len(),
                ),
            });
        }
    }
    Ok(())
}

/// Why the two sides of a pair cannot be compared; `None` when they can.
pub(crate) fn mismatch(p: &Pair) -> Option<String> {
    let (ta, tb) = (p.a.1, p.b.1);
    let (pa, pb) = (p.a.0.path.display(), p.b.0.path.display());
    let detail = if ta.shape != tb.shape {
        let hint = if shared_rows(ta, tb).is_some() {
            " (a resized vocabulary? diff with shared_rows / --compare-shared-rows compares the \
             rows both share)"
        } else {
            ""
        };
        format!(
            "shape {:?} in base ({pa}) but {:?} in tuned ({pb}){hint}",
            ta.shape, tb.shape
        )
    } else if !((ta.dtype.is_float() && tb.dtype.is_float()) || ta.dtype == tb.dtype) {
        format!(
            "dtype {} in base ({pa}) cannot be compared with {} in tuned ({pb})",
            ta.dtype, tb.dtype
        )
    } else {
        return None;
    };
    Some(detail)
}

//! FP8 and MXFP4 weights stored with scales (design §1, "Scaled FP8 weights"): which tensor
//! scales which weight and how (one scale, one per row, one per block), and the dequantised
//! values of a stretch of a weight, found by index arithmetic, never by materialising the
//! whole tensor.
//!
//! An MXFP4 weight (OCP MX: F4 E2M1 codes, two per byte, the first in the low nibble) has one
//! E8M0 scale per 32 codes along its last dimension: an `F4` tensor `NAME` with `NAME_scales`,
//! or gpt-oss's U8 `X_blocks` (seen as F4, [`crate::checkpoint::Checkpoint::get_value`]) with
//! `X_scales`; its value is `f32(code) * 2^(scale - 127)`, rounded once in f32.
//!
//! A weight `NAME` stored in an FP8 dtype (OCP E4M3 or E5M2, or AMD's FNUZ variants) is scaled
//! when `NAME_scale_inv` (DeepSeek-V3) or `NAME_scale` (compressed-tensors exports) sits beside it; its value is
//! `f32(code) * f32(scale)`, rounded once in f32. `NAME_input_scale` beside such a weight is an
//! activation scale: like the weight scales, it is reported but not counted as a weight.

use std::collections::BTreeMap;

use crate::checkpoint::Checkpoint;
use crate::dtype::widen::fp8_value;
use crate::dtype::{widen, Dtype};
use crate::error::{Error, Result};
use crate::safetensors::{Shard, TensorInfo};

/// Suffixes that name the dequantisation scale of the weight `NAME` as `NAME<suffix>`.
const SCALE_SUFFIXES: [&str; 2] = ["_scale_inv", "_scale"];
/// Activation scales stored beside scaled weights: `X.input_scale` for the weight `X.weight`.
const INPUT_SCALE: &str = "input_scale";

/// How a scale tensor covers its weight, seen as `rows x cols` (`cols` the last dimension).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One scale for the whole tensor.
    Tensor,
    /// One scale per row (per output channel).
    Rows,
    /// One scale per block of `rows x cols` elements; edge blocks may be smaller.
    Blocks { rows: u64, cols: u64 },
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Layout::Tensor => write!(f, "per-tensor"),
            Layout::Rows => write!(f, "per-row"),
            Layout::Blocks { rows, cols } => write!(f, "block {rows}x{cols}"),
        }
    }
}

/// A scaled weight: its scale tensor and how the scale covers it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scaled<'a> {
    pub(crate) scale: (&'a Shard, &'a TensorInfo),
    pub(crate) layout: Layout,
    /// Elements per row of the weight (its last dimension; the whole tensor when 1-D).
    pub(crate) cols: u64,
}

/// The scale tensors of one checkpoint side, by the paired names of the weights they scale,
/// and every tensor name (paired) that is a scale rather than a weight.
#[derive(Default)]
pub(crate) struct Scales<'a> {
    pub(crate) of: BTreeMap<String, (String, Scaled<'a>)>,
    pub(crate) names: std::collections::BTreeSet<String>,
}

/// Elements per MXFP4 block: one E8M0 scale for 32 FP4 codes along the last dimension.
const MX_BLOCK: u64 = 32;

/// The layout of the E8M0 scales `scale` of the MXFP4 weight `weight` (F4 codes): one scale
/// per block of 32 codes along the last dimension, stored as F8_E8M0 or as U8 (gpt-oss).
fn mx_layout(name: &str, weight: &TensorInfo, scale: &TensorInfo) -> Result<Layout> {
    let (last, prefix) = weight.shape.split_last().unwrap_or((&1, &[]));
    let mut want = prefix.to_vec();
    want.push(last.div_ceil(MX_BLOCK));
    if !matches!(scale.dtype, Dtype::F8E8M0 | Dtype::U8) || scale.shape != want {
        return Err(Error::Tensor {
            path: Default::default(),
            tensor: name.to_string(),
            reason: format!(
                "MXFP4 weight {:?} with scales '{}' ({} {:?}): rlmask reads one E8M0 scale \
                 (F8_E8M0 or U8) per 32 codes along the last dimension, scales {want:?}",
                weight.shape, scale.name, scale.dtype, scale.shape
            ),
        });
    }
    Ok(Layout::Blocks {
        rows: 1,
        cols: MX_BLOCK,
    })
}

/// The names the scales of weight `weight` may have: FP8 `NAME_scale_inv` or `NAME_scale`;
/// MXFP4 `NAME_scales` (an F4 tensor) or `X_scales` beside gpt-oss's `X_blocks`.
fn scale_candidates(weight: &str, dtype: Dtype) -> Vec<String> {
    if dtype == Dtype::F4 {
        let stem = weight.strip_suffix("_blocks").unwrap_or(weight);
        vec![format!("{stem}_scales"), format!("{weight}_scale")]
    } else {
        SCALE_SUFFIXES.map(|s| format!("{weight}{s}")).to_vec()
    }
}

/// The layout of `scale` over `weight`, given the block size the checkpoint declares (if any).
fn layout(
    name: &str,
    weight: &TensorInfo,
    scale: &TensorInfo,
    block: Option<[u64; 2]>,
) -> Result<Layout> {
    let shape = &weight.shape;
    let cols = shape.last().copied().unwrap_or(1).max(1);
    let rows = weight.numel / cols;
    let refuse = |why: String| {
        Err(Error::Tensor {
            path: Default::default(),
            tensor: name.to_string(),
            reason: why,
        })
    };
    if !matches!(scale.dtype, Dtype::F32 | Dtype::BF16 | Dtype::F16) {
        return refuse(format!(
            "its scale '{}' is {}, not a floating dtype rlmask can dequantise with (F32, BF16, \
             F16)",
            scale.name, scale.dtype
        ));
    }
    if scale.numel == 1 {
        return Ok(Layout::Tensor);
    }
    let s = &scale.shape;
    if shape.len() == 2 && (s.as_slice() == [rows] || s.as_slice() == [rows, 1]) {
        return Ok(Layout::Rows);
    }
    if shape.len() == 2 && s.len() == 2 {
        let Some([br, bc]) = block else {
            return refuse(format!(
                "FP8 weight {shape:?} with block scales {s:?} ('{}'): the block size is needed \
                 and unknown; it is read from config.json's quantization_config.\
                 weight_block_size, or give it (block_size=(128, 128), --block-size 128x128)",
                scale.name
            ));
        };
        if br == 0 || bc == 0 || s[0] != rows.div_ceil(br) || s[1] != cols.div_ceil(bc) {
            return refuse(format!(
                "FP8 weight {shape:?} with block scales {s:?} ('{}') does not fit blocks of \
                 {br}x{bc} (expected scales [{}, {}])",
                scale.name,
                rows.div_ceil(br.max(1)),
                cols.div_ceil(bc.max(1))
            ));
        }
        return Ok(Layout::Blocks { rows: br, cols: bc });
    }
    refuse(format!(
        "unknown scale layout: FP8 weight {shape:?} with scale '{}' of shape {s:?} (rlmask knows \
         one scale, one per row, and 2-D blocks); it is not compared as if unscaled",
        scale.name
    ))
}

/// Finds the scaled FP8 weights among the `names` (paired) of one side that `keep` selects;
/// `get` looks up any name of that side.
pub(crate) fn find<'a>(
    names: &BTreeMap<String, &'a str>,
    keep: &dyn Fn(&str) -> bool,
    get: impl Fn(&str) -> Option<(&'a Shard, &'a TensorInfo)>,
    block: Option<[u64; 2]>,
) -> Result<Scales<'a>> {
    let mut of = BTreeMap::new();
    let mut scale_names = std::collections::BTreeSet::new();
    for weight in names.keys().filter(|n| keep(n)) {
        let Some((shard, w)) = get(weight) else {
            continue;
        };
        if !w.dtype.is_fp8() && w.dtype != Dtype::F4 {
            continue;
        }
        let candidates = scale_candidates(weight, w.dtype);
        if w.dtype == Dtype::F4 && !candidates.iter().any(|n| get(n).is_some()) {
            return Err(Error::Tensor {
                path: shard.path.clone(),
                tensor: weight.clone(),
                reason: format!(
                    "F4 codes without their E8M0 scales ('{}'): MXFP4 values cannot be read \
                     from the codes alone",
                    candidates[0]
                ),
            });
        }
        for scale_name in candidates {
            let Some(scale) = get(&scale_name) else {
                continue;
            };
            let layout = if w.dtype == Dtype::F4 {
                mx_layout(weight, w, scale.1)
            } else {
                layout(weight, w, scale.1, block)
            };
            let layout = layout.map_err(|e| match e {
                Error::Tensor { tensor, reason, .. } => Error::Tensor {
                    path: shard.path.clone(),
                    tensor,
                    reason,
                },
                other => other,
            })?;
            // Scales are read all through the pass, by every worker: a remote file's are
            // fetched here, once, and kept.
            scale.0.pinned(scale.1)?;
            let cols = w.shape.last().copied().unwrap_or(1).max(1);
            of.insert(
                weight.clone(),
                (
                    scale_name.clone(),
                    Scaled {
                        scale,
                        layout,
                        cols,
                    },
                ),
            );
            scale_names.insert(scale_name);
            break;
        }
        if let Some(prefix) = weight.strip_suffix("weight") {
            let input = format!("{prefix}{INPUT_SCALE}");
            if names.contains_key(&input) {
                scale_names.insert(input);
            }
        }
    }
    Ok(Scales {
        of,
        names: scale_names,
    })
}

/// The scale of element `k` of the scale tensor, as f32 bits.
#[inline(always)]
fn scale_at(s: &Scaled, k: usize) -> f32 {
    let (shard, t) = s.scale;
    let bytes = shard.bytes(t);
    let bits = match t.dtype {
        Dtype::F32 => u32::from_le_bytes(bytes[4 * k..4 * k + 4].try_into().unwrap()),
        Dtype::BF16 => widen::bf16(u16::from_le_bytes([bytes[2 * k], bytes[2 * k + 1]])),
        Dtype::U8 | Dtype::F8E8M0 => widen::e8m0_compute(bytes[k]),
        _ => widen::f16_table()[u16::from_le_bytes([bytes[2 * k], bytes[2 * k + 1]]) as usize],
    };
    f32::from_bits(bits)
}

/// Calls `run(first, last, scale index)` for the runs of elements `start..end` (global element
/// indices) that share one scale. Positions are divided out once, then advanced run by run.
#[inline(always)]
fn runs(
    layout: Layout,
    cols: u64,
    start: usize,
    end: usize,
    mut run: impl FnMut(usize, usize, usize),
) {
    let cols = cols as usize;
    let mut i = start;
    match layout {
        Layout::Tensor => run(start, end, 0),
        Layout::Rows => {
            let (mut r, mut c) = (i / cols, i % cols);
            while i < end {
                let stop = end.min(i + cols - c);
                run(i, stop, r);
                (i, r, c) = (stop, r + 1, 0);
            }
        }
        Layout::Blocks { rows: br, cols: bc } => {
            let (br, bc) = (br as usize, bc as usize);
            let per_row = cols.div_ceil(bc);
            let (r, mut c) = (i / cols, i % cols);
            let (mut row_block, mut row_in) = (r / br, r % br);
            let (mut col_block, mut col_in) = (c / bc, c % bc);
            while i < end {
                // To the end of the block or of the row, whichever comes first.
                let stop = end.min(i + (bc - col_in).min(cols - c));
                run(i, stop, row_block * per_row + col_block);
                let step = stop - i;
                (i, c, col_in) = (stop, c + step, col_in + step);
                if col_in == bc {
                    (col_block, col_in) = (col_block + 1, 0);
                }
                if c == cols {
                    (c, col_block, col_in, row_in) = (0, 0, 0, row_in + 1);
                    if row_in == br {
                        (row_block, row_in) = (row_block + 1, 0);
                    }
                }
            }
        }
    }
}

/// The dequantised values (f32, little-endian bytes) of elements `start..start + codes.len()`
/// of a scaled weight whose codes are `codes`, written to `out` (4 bytes per code): each
/// `f32(code) * f32(scale)`, rounded once.
pub(crate) fn dequantise(codes: &[u8], dtype: Dtype, start: usize, s: &Scaled, out: &mut [u8]) {
    if dtype == Dtype::F4 {
        return dequantise_f4(codes, start, s, out);
    }
    let table = crate::dtype::widen::f8_table(dtype);
    runs(s.layout, s.cols, start, start + codes.len(), |a, b, k| {
        let scale = scale_at(s, k);
        let out = &mut out[(a - start) * 4..(b - start) * 4];
        for (o, &c) in out.chunks_exact_mut(4).zip(&codes[a - start..b - start]) {
            let v = match dtype {
                Dtype::F8E5M2 => fp8_value::<true>(c),
                Dtype::F8E4M3 => fp8_value::<false>(c),
                _ => f32::from_bits(table[c as usize]),
            };
            o.copy_from_slice(&(v * scale).to_le_bytes());
        }
    });
}

/// FP4 code `j` of a stretch of packed codes (two per byte, the first in the low nibble).
#[inline(always)]
fn nibble(packed: &[u8], j: usize) -> u8 {
    (packed[j / 2] >> (4 * (j % 2))) & 0xf
}

/// [`dequantise`] for MXFP4: `packed` holds the codes of elements `start..start + 2 *
/// packed.len()` (`start` even), each value `f32(code) * 2^(scale - 127)`, rounded once in f32.
fn dequantise_f4(packed: &[u8], start: usize, s: &Scaled, out: &mut [u8]) {
    runs(
        s.layout,
        s.cols,
        start,
        start + 2 * packed.len(),
        |a, b, k| {
            let scale = scale_at(s, k);
            for j in a - start..b - start {
                let v = widen::F4_VALUES[nibble(packed, j) as usize] * scale;
                out[4 * j..4 * j + 4].copy_from_slice(&v.to_le_bytes());
            }
        },
    );
}

/// The scale of every block of [`crate::kernel::BLOCK`] elements of the stretch
/// `start..start + n` (for [`crate::kernel::load_scaled`]), into `out`; false when a block
/// straddles two scales (edge blocks of shapes that are not multiples of 64): the caller then
/// dequantises with [`dequantise`].
pub(crate) fn block_scales(n: usize, start: usize, s: &Scaled, out: &mut Vec<f32>) -> bool {
    use crate::kernel::BLOCK;
    out.clear();
    out.resize(n.div_ceil(BLOCK), 0.0);
    let mut ok = true;
    runs(s.layout, s.cols, start, start + n, |a, b, k| {
        if a != start && !(a - start).is_multiple_of(BLOCK) {
            ok = false;
        }
        if ok {
            let scale = scale_at(s, k);
            out[(a - start) / BLOCK..(b - start).div_ceil(BLOCK)].fill(scale);
        }
    });
    ok
}

/// The elements as stored, code and scale together (`scale bits << 32 | code`, u64
/// little-endian bytes), written to `out` (8 bytes per code): two elements compare equal under the exact
/// criterion iff both their code and their block's scale are bit-identical.
pub(crate) fn stored_keys(codes: &[u8], dtype: Dtype, start: usize, s: &Scaled, out: &mut [u8]) {
    if dtype == Dtype::F4 {
        runs(
            s.layout,
            s.cols,
            start,
            start + 2 * codes.len(),
            |a, b, k| {
                let scale = (scale_at(s, k).to_bits() as u64) << 32;
                for j in a - start..b - start {
                    let key = scale | nibble(codes, j) as u64;
                    out[8 * j..8 * j + 8].copy_from_slice(&key.to_le_bytes());
                }
            },
        );
        return;
    }
    runs(s.layout, s.cols, start, start + codes.len(), |a, b, k| {
        let scale = (scale_at(s, k).to_bits() as u64) << 32;
        let out = &mut out[(a - start) * 8..(b - start) * 8];
        for (o, &c) in out.chunks_exact_mut(8).zip(&codes[a - start..b - start]) {
            o.copy_from_slice(&(scale | c as u64).to_le_bytes());
        }
    });
}

/// The values of tensor `name` of `ckpt` as f32, as the comparison reads them: floating
/// dtypes widened (F64 rounded to f32), FP8 and MXFP4 weights dequantised with their scales
/// (`block`: the FP8 block size, as config.json declares it), an FP8 weight without scales as
/// its codes' values. For passes that need a whole matrix's values (`spectrum`, `rank`).
pub fn values(ckpt: &Checkpoint, name: &str, block: Option<[u64; 2]>) -> Result<Vec<f32>> {
    let (shard, t) = ckpt.get_value(name).ok_or_else(|| Error::Tensor {
        path: ckpt.path.clone(),
        tensor: name.to_string(),
        reason: "no such tensor".into(),
    })?;
    let raw = shard.read(t)?;
    let n = t.numel as usize;
    let floats = |bytes: Vec<u8>| {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect::<Vec<f32>>()
    };
    let scaled = if t.dtype.is_fp8() || t.dtype == Dtype::F4 {
        let names: BTreeMap<String, &str> = [(name.to_string(), name)].into_iter().collect();
        let keep = |n: &str| n == name;
        let found = find(&names, &keep, |n| ckpt.get_value(n), block)?;
        found.of.get(name).map(|(_, s)| *s)
    } else {
        None
    };
    let out = match (scaled, t.dtype) {
        (Some(s), d) => {
            let mut bytes = vec![0u8; 4 * n];
            dequantise(raw, d, 0, &s, &mut bytes);
            floats(bytes)
        }
        (None, Dtype::F32) => floats(raw.to_vec()),
        (None, Dtype::F64) => raw
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect(),
        (None, Dtype::BF16) => raw
            .chunks_exact(2)
            .map(|c| f32::from_bits(widen::bf16(u16::from_le_bytes([c[0], c[1]]))))
            .collect(),
        (None, Dtype::F16) => {
            let table = widen::f16_table();
            raw.chunks_exact(2)
                .map(|c| f32::from_bits(table[u16::from_le_bytes([c[0], c[1]]) as usize]))
                .collect()
        }
        (None, d) if d.is_fp8() || d == Dtype::F8E8M0 => {
            let table = widen::f8_table(d);
            raw.iter()
                .map(|&c| f32::from_bits(table[c as usize]))
                .collect()
        }
        (None, d) => {
            return Err(Error::Tensor {
                path: shard.path.clone(),
                tensor: name.to_string(),
                reason: format!("{d} holds no floating values"),
            })
        }
    };
    shard.check_faults()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scale index of every element, the slow way.
    fn naive(layout: Layout, rows: usize, cols: usize) -> Vec<usize> {
        (0..rows * cols)
            .map(|i| {
                let (r, c) = (i / cols, i % cols);
                match layout {
                    Layout::Tensor => 0,
                    Layout::Rows => r,
                    Layout::Blocks { rows: br, cols: bc } => {
                        (r / br as usize) * cols.div_ceil(bc as usize) + c / bc as usize
                    }
                }
            })
            .collect()
    }

    #[test]
    fn runs_cover_every_element_with_its_scale() {
        for (rows, cols) in [(37usize, 50usize), (128, 256), (5, 3), (1, 1000)] {
            for layout in [
                Layout::Tensor,
                Layout::Rows,
                Layout::Blocks { rows: 16, cols: 32 },
                Layout::Blocks { rows: 1, cols: 7 },
            ] {
                let want = naive(layout, rows, cols);
                // Every stretch boundary, including ones inside rows and blocks.
                for (start, end) in [
                    (0, rows * cols),
                    (3, rows * cols),
                    (33, 97.min(rows * cols)),
                ] {
                    if start >= end {
                        continue;
                    }
                    let mut got = vec![usize::MAX; rows * cols];
                    let mut last = start;
                    runs(layout, cols as u64, start, end, |a, b, k| {
                        assert_eq!(a, last, "runs are contiguous");
                        last = b;
                        got[a..b].fill(k);
                    });
                    assert_eq!(last, end);
                    assert_eq!(
                        &got[start..end],
                        &want[start..end],
                        "{layout:?} {rows}x{cols}"
                    );
                }
            }
        }
    }
}

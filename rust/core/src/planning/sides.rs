//! One side of a comparison (a checkpoint's tensors under the names they pair by) and a pair
//! of tensors, one from each side: what every plan is made of.

use std::collections::BTreeMap;

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::fp8;
use crate::names;
use crate::safetensors::{Shard, TensorInfo};

/// A tensor left out of the comparison, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub name: String,
    pub reason: String,
}

pub(crate) struct Pair<'a> {
    pub(crate) name: &'a str,
    pub(crate) a: (&'a Shard, &'a TensorInfo),
    pub(crate) b: (&'a Shard, &'a TensorInfo),
    /// Compare only the first this many rows (shapes that differ in rows only, with
    /// [`DiffOptions::shared_rows`]); `None`: the whole tensor.
    pub(crate) rows: Option<u64>,
}

impl Pair<'_> {
    /// The shape compared: the base's, cut to the shared rows.
    pub(crate) fn shape(&self) -> Vec<u64> {
        let mut shape = self.a.1.shape.clone();
        if let Some(r) = self.rows {
            shape[0] = r;
        }
        shape
    }

    /// Elements compared: a prefix of both tensors (rows are contiguous, row-major).
    pub(crate) fn numel(&self) -> u64 {
        self.shape().iter().product()
    }
}

/// The rows two tensors share when their shapes differ in the number of rows only (a
/// resized vocabulary): `Some(min rows)`, else `None`.
pub(crate) fn shared_rows(ta: &TensorInfo, tb: &TensorInfo) -> Option<u64> {
    let (sa, sb) = (&ta.shape, &tb.shape);
    (sa.len() == sb.len() && !sa.is_empty() && sa[1..] == sb[1..] && sa[0] != sb[0])
        .then(|| sa[0].min(sb[0]))
}

/// One side's tensors under the names they are paired by.
pub(crate) struct Side<'a> {
    pub(crate) ckpt: &'a Checkpoint,
    /// Paired name -> stored name.
    pub(crate) names: BTreeMap<String, &'a str>,
    pub(crate) renamed: Vec<(String, String)>,
    /// Tensors as their values are read ([`Checkpoint::get_value`]: MXFP4 blocks as F4
    /// elements), or as stored, byte for byte (patches).
    pub(crate) values: bool,
}

impl<'a> Side<'a> {
    /// One side's tensors as their values are read (diffs and trajectories).
    pub(crate) fn new(
        ckpt: &'a Checkpoint,
        what: &str,
        map: &[(String, String)],
    ) -> Result<Side<'a>> {
        Ok(Side {
            values: true,
            ..Self::stored(ckpt, what, map)?
        })
    }

    /// One side's tensors as stored, every one its bytes (patches).
    pub(crate) fn stored(
        ckpt: &'a Checkpoint,
        what: &str,
        map: &[(String, String)],
    ) -> Result<Side<'a>> {
        let mut names = BTreeMap::new();
        let mut renamed = Vec::new();
        for stored in ckpt.names() {
            let paired = names::canonical(stored, map);
            if paired != stored {
                renamed.push((stored.to_string(), paired.clone()));
            }
            if let Some(other) = names.insert(paired.clone(), stored) {
                return Err(Error::Pairing {
                    reason: format!(
                        "{what} ({}): '{other}' and '{stored}' both pair as '{paired}' once \
                         wrapper segments are removed and the name map applied",
                        ckpt.path.display()
                    ),
                });
            }
        }
        Ok(Side {
            ckpt,
            names,
            renamed,
            values: false,
        })
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    pub(crate) fn get(&self, name: &str) -> Option<(&'a Shard, &'a TensorInfo)> {
        let stored = self.names.get(name)?;
        if self.values {
            self.ckpt.get_value(stored)
        } else {
            self.ckpt.get(stored)
        }
    }

    /// Elements of the floating tensors among `names`.
    pub(crate) fn floating_numel<'n>(&self, names: impl Iterator<Item = &'n String>) -> u64 {
        names
            .filter_map(|n| self.get(n))
            .filter(|(_, t)| t.dtype.is_float())
            .map(|(_, t)| t.numel)
            .sum()
    }
}

/// Each side's scale of a pair's weight, when it is a scaled FP8 weight.
pub(crate) type Sides<'a> = (Option<fp8::Scaled<'a>>, Option<fp8::Scaled<'a>>);

//! Tensor names: the canonical form shared by checkpoint pairing and the training hooks, and
//! the escaped form shown on terminals.

use pyo3::prelude::*;
use rlmask_core::names;

/// `name` without wrapper segments (FSDP, activation checkpointing, `torch.compile`) or a DDP
/// `module.` prefix, then with the longest matching `(from, to)` prefix of `name_map` replaced.
#[pyfunction]
#[pyo3(signature = (name, name_map=Vec::new()))]
pub fn canonical_name(name: &str, name_map: Vec<(String, String)>) -> String {
    names::canonical(name, &name_map)
}

/// `text` as it may be shown on a terminal: control characters (ANSI escape sequences,
/// newlines, carriage returns, C1 controls) escaped as `\n`, `\x1b`, ...; the rest unchanged.
#[pyfunction]
pub fn printable(text: &str) -> String {
    rlmask_core::text::printable(text).into_owned()
}

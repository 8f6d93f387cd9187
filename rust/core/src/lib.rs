//! rlmask core: memory-mapped safetensors checkpoints with validated headers, the
//! update-sparsity comparison kernel (design §1), and packed changed-bit masks.
//!
//! There is no Python here; `rust/py` holds the thin bindings.

// The crate by stage: reading files, planning a pass, the comparison kernels, masks, the
// passes themselves; dtypes, errors and terminal text beside them.
pub mod dtype;
pub mod error;
pub mod kernels;
pub mod masks;
pub mod passes;
pub mod planning;
pub mod reading;
pub mod text;

// Every module is also reachable by its own name (`crate::diff`, `rlmask_core::patch`).
pub use kernels as kernel;
#[cfg(target_arch = "x86_64")]
use kernels::simd;
pub use masks::{bits, maskfile};
pub use passes::{codec, diff, patch, trajectory};
pub use planning::{fp8, names, plan, sample, sides};
pub use reading::{atomic, checkpoint, guard, readahead, remote, safetensors};

pub use checkpoint::Checkpoint;
pub use diff::{diff, DiffOptions, DiffResult, MaskFileSpec, Progress, TensorDiff};
pub use dtype::Dtype;
pub use error::{Error, Result};
pub use kernel::Criterion;
pub use plan::{pairing, Pairing, PlanOptions, PlannedPair};
pub use safetensors::{Shard, TensorInfo};
pub use sides::Skipped;

/// Helpers shared by the unit tests.
#[cfg(test)]
pub(crate) mod testing {
    /// A xorshift64 generator: reproducible pseudo-random words from `seed` (not zero).
    pub fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        }
    }

    /// `n` pseudo-random bytes from `seed`.
    pub fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
        let mut next = xorshift(seed);
        (0..n).map(|_| next() as u8).collect()
    }

    /// Writes a safetensors file of `tensors` (name, dtype, shape, raw bytes) in this order,
    /// its header padded to 8 bytes.
    pub fn write_tensors(
        path: &std::path::Path,
        tensors: &[(&str, crate::dtype::Dtype, Vec<u64>, Vec<u8>)],
    ) {
        let mut header = serde_json::Map::new();
        let mut at = 0usize;
        for (name, dtype, shape, bytes) in tensors {
            header.insert(
                name.to_string(),
                serde_json::json!({
                    "dtype": dtype.name(),
                    "shape": shape,
                    "data_offsets": [at, at + bytes.len()],
                }),
            );
            at += bytes.len();
        }
        let mut text = serde_json::to_vec(&header).unwrap();
        text.resize(text.len().div_ceil(8) * 8, b' ');
        let mut file = (text.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(&text);
        for (_, _, _, bytes) in tensors {
            file.extend_from_slice(bytes);
        }
        std::fs::write(path, file).unwrap();
    }
}

//! rlmask core: memory-mapped safetensors checkpoints with validated headers, the
//! update-sparsity comparison kernel (design §1), and packed changed-bit masks.
//!
//! There is no Python here; `rust/py` holds the thin bindings.

pub mod bits;
pub mod checkpoint;
pub mod codec;
pub mod diff;
pub mod dtype;
pub mod error;
pub mod guard;
pub mod kernel;
pub mod maskfile;
pub mod names;
pub mod patch;
pub mod plan;
pub mod readahead;
pub mod safetensors;
pub mod scaled;
#[cfg(target_arch = "x86_64")]
mod simd;
pub mod text;
pub mod trajectory;

pub use checkpoint::Checkpoint;
pub use diff::{diff, DiffOptions, DiffResult, MaskFileSpec, Progress, Skipped, TensorDiff};
pub use dtype::Dtype;
pub use error::{Error, Result};
pub use kernel::Criterion;
pub use plan::{pairing, Pairing, PlanOptions, PlannedPair};
pub use safetensors::{Shard, TensorInfo};

//! The passes over checkpoints, each run on a plan: `diff` (two checkpoints), `trajectory` (a
//! run's checkpoints), `patch` (sparse patches, with their index `codec`).

pub mod codec;
pub mod diff;
pub mod patch;
pub mod trajectory;

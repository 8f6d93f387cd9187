//! Planning a pass: names as paired (wrappers removed, name maps applied), which tensors pair,
//! and scaled weights (FP8 and MXFP4, `fp8`) with their scales.

pub mod fp8;
pub mod names;
pub mod plan;
pub mod sample;
pub mod sides;

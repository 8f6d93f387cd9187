//! Planning a pass: names as paired (wrappers removed, name maps applied), which tensors pair,
//! and scaled weights (FP8 and MXFP4) with their scales.

pub mod names;
pub mod plan;
pub mod scaled;

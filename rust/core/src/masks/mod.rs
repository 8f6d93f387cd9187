//! Masks: packed changed-bits and their algebra, and the `.rlmask` file format.

pub mod bits;
pub mod maskfile;

//! Reading checkpoints: mapped safetensors shards with every header byte validated, the forms a
//! checkpoint takes (file, folder, index), surviving files truncated while mapped, and reading
//! ahead of a pass on a cold cache.

pub mod atomic;
pub mod checkpoint;
pub mod guard;
pub mod readahead;
pub mod remote;
pub mod safetensors;

//! `.rlmask` files (DESIGN §3): a safetensors file with one U8 tensor of packed bits per
//! masked tensor (same name, [`padded_len`] bytes) and string metadata: `format=rlmask`,
//! `version`, `bitorder=little`, the caller's provenance, and `tensors`, a JSON object mapping
//! each name to its original `shape`, `dtype` and `numel`.

use std::collections::BTreeMap;
use std::path::Path;

use crate::bits::padded_len;
use crate::error::{Error, Result};
use crate::safetensors::U8FileWriter;

/// Version of the file format written.
pub const VERSION: &str = "1";

/// What a mask file records about one masked tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskEntry {
    pub name: String,
    pub shape: Vec<u64>,
    pub dtype: String,
    pub numel: u64,
}

/// The file's `__metadata__`: the format keys, then `provenance` (which may not override
/// them), then the `tensors` description.
pub fn metadata(
    entries: &[MaskEntry],
    provenance: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut meta: BTreeMap<String, String> = provenance
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "format" | "version" | "bitorder" | "tensors"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    meta.insert("format".into(), "rlmask".into());
    meta.insert("version".into(), VERSION.into());
    meta.insert("bitorder".into(), "little".into());
    let tensors: serde_json::Map<String, serde_json::Value> = entries
        .iter()
        .map(|e| {
            let d = serde_json::json!({"shape": e.shape, "dtype": e.dtype, "numel": e.numel});
            (e.name.clone(), d)
        })
        .collect();
    meta.insert(
        "tensors".into(),
        serde_json::to_string(&tensors).expect("serialisable"),
    );
    meta
}

/// Starts writing a mask file for `entries`; fill [`U8FileWriter::slices`] with packed bits
/// (in the order of `entries`) and call [`U8FileWriter::finish`].
pub fn create(
    path: &Path,
    entries: &[MaskEntry],
    provenance: &BTreeMap<String, String>,
) -> Result<U8FileWriter> {
    let sizes: Vec<(&str, usize)> = entries
        .iter()
        .map(|e| (e.name.as_str(), padded_len(e.numel as usize)))
        .collect();
    U8FileWriter::create(path, &sizes, &metadata(entries, provenance))
}

/// Writes packed masks held in memory (`data[i]` for `entries[i]`, at least
/// `numel.div_ceil(8)` bytes each; bits past `numel` are cleared) as a mask file, atomically.
pub fn write(
    path: &Path,
    entries: &[MaskEntry],
    data: &[&[u8]],
    provenance: &BTreeMap<String, String>,
) -> Result<()> {
    if entries.len() != data.len() {
        return Err(Error::InvalidArgument(format!(
            "{} mask entries but {} arrays",
            entries.len(),
            data.len()
        )));
    }
    for (e, d) in entries.iter().zip(data) {
        crate::bits::check_len(d, e.numel as usize, &e.name)?;
    }
    let mut writer = create(path, entries, provenance)?;
    for ((out, e), d) in writer.slices().into_iter().zip(entries).zip(data) {
        let numel = e.numel as usize;
        let n = numel.div_ceil(8);
        out[..n].copy_from_slice(&d[..n]);
        if numel % 8 != 0 {
            out[n - 1] &= (1u8 << (numel % 8)) - 1;
        }
    }
    writer.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safetensors::Shard;

    #[test]
    fn writes_the_documented_format() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.rlmask");
        let entries = vec![MaskEntry {
            name: "w".into(),
            shape: vec![2, 5],
            dtype: "BF16".into(),
            numel: 10,
        }];
        let prov = BTreeMap::from([
            ("criterion".to_string(), "exact".to_string()),
            ("format".to_string(), "spoofed".to_string()),
        ]);
        write(&p, &entries, &[&[0xff, 0xff, 0xff]], &prov).unwrap();
        let shard = Shard::open(&p).unwrap();
        assert_eq!(shard.metadata["format"], "rlmask");
        assert_eq!(shard.metadata["bitorder"], "little");
        assert_eq!(shard.metadata["criterion"], "exact");
        assert_eq!(
            shard.metadata["tensors"],
            r#"{"w":{"dtype":"BF16","numel":10,"shape":[2,5]}}"#
        );
        // Bits past numel are cleared; the payload is padded to 8 bytes.
        assert_eq!(
            shard.bytes(&shard.tensors[0]),
            &[0xff, 0x03, 0, 0, 0, 0, 0, 0]
        );
        assert!(write(&p, &entries, &[&[0xff]], &prov).is_err());
    }
}

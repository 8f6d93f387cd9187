//! `.rlmask` files (design §3): a safetensors file with one U8 tensor of packed bits per
//! masked tensor (same name, [`padded_len`] bytes) and string metadata: `format=rlmask`,
//! `version`, `bitorder=little`, the caller's provenance, and `tensors`, a JSON object mapping
//! each name to its original `shape`, `dtype` and `numel`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::bits::padded_len;
use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::safetensors::{Entries, Shard, U8FileWriter, MAX_DIM};

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
        if !numel.is_multiple_of(8) {
            out[n - 1] &= (1u8 << (numel % 8)) - 1;
        }
    }
    writer.finish()
}

/// An `.rlmask` file opened for reading: the mapped file and its validated description.
#[derive(Debug)]
pub struct MaskFile {
    pub path: PathBuf,
    /// Described tensors, sorted by name.
    pub entries: Vec<MaskEntry>,
    /// Every `__metadata__` key (format keys, provenance and `tensors`).
    pub metadata: BTreeMap<String, String>,
    shard: Shard,
    /// Name -> index into `shard.tensors`.
    stored: BTreeMap<String, usize>,
}

/// One entry of the `tensors` metadata; the derived deserializer rejects a repeated field.
#[derive(Deserialize)]
struct Described {
    shape: Vec<u64>,
    dtype: String,
    numel: u64,
}

impl MaskFile {
    /// Opens and validates a mask file: the safetensors header, `format`, `version`,
    /// `bitorder`, and for every tensor its description (shape, numel, dtype) against the
    /// stored packed bytes. Every failure is [`Error::Mask`] naming the file and, where there
    /// is one, the tensor.
    pub fn open(path: &Path) -> Result<MaskFile> {
        let bad = |tensor: Option<&str>, reason: String| Error::mask(path, tensor, reason);
        if path.is_dir() {
            return Err(bad(
                None,
                "a directory (a checkpoint?), not a mask file: make a mask with \
                 `rlmask diff BASE TUNED --save-mask FILE.rlmask`"
                    .into(),
            ));
        }
        let shard = Shard::open(path).map_err(|e| match e {
            Error::Tensor { tensor, reason, .. } => bad(Some(&tensor), reason),
            other => {
                let text = other.to_string();
                let prefix = format!("{}: ", crate::text::printable_path(path));
                bad(
                    None,
                    text.strip_prefix(&prefix).unwrap_or(&text).to_string(),
                )
            }
        })?;
        let meta = &shard.metadata;
        let key = |k: &str| meta.get(k).map(String::as_str);
        if key("format") != Some("rlmask") {
            let hint = if key("format") == Some("rlmask-patch") {
                "; it is an rlmask patch (inspect it with `rlmask patch info`)"
            } else {
                "; it looks like checkpoint weights: make a mask with \
                 `rlmask diff BASE TUNED --save-mask FILE.rlmask`"
            };
            return Err(bad(
                None,
                format!(
                    "not an rlmask mask (metadata format is {}, expected 'rlmask'){hint}",
                    key("format").map_or("missing".into(), |f| format!("'{f}'"))
                ),
            ));
        }
        if key("version") != Some(VERSION) {
            return Err(bad(
                None,
                format!(
                    "mask format version {} is not supported (this rlmask reads version {VERSION}); \
                     upgrade rlmask",
                    key("version").map_or("missing".into(), |v| format!("'{v}'"))
                ),
            ));
        }
        if key("bitorder") != Some("little") {
            return Err(bad(
                None,
                format!(
                    "bitorder {} is not supported (expected 'little')",
                    key("bitorder").map_or("missing".into(), |v| format!("'{v}'"))
                ),
            ));
        }
        let text = key("tensors").ok_or_else(|| bad(None, "no 'tensors' metadata".into()))?;
        let described: Entries<Box<serde_json::value::RawValue>> = serde_json::from_str(text)
            .map_err(|e| {
                bad(
                    None,
                    format!("'tensors' metadata is not a JSON object: {e}"),
                )
            })?;
        if let Some(name) = described.repeated() {
            return Err(bad(Some(name), "described more than once".into()));
        }
        let stored: BTreeMap<String, usize> = shard
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        let mut entries = Vec::with_capacity(described.0.len());
        for (name, raw) in &described.0 {
            let t = Some(name.as_str());
            let d: Described = serde_json::from_str(raw.get())
                .map_err(|e| bad(t, format!("malformed description: {e}")))?;
            if let Some(dim) = d.shape.iter().find(|&&x| x > MAX_DIM) {
                return Err(bad(t, format!("dimension {dim} exceeds 2^63 - 1")));
            }
            let numel = d.shape.iter().try_fold(1u64, |acc, &x| acc.checked_mul(x));
            if numel != Some(d.numel) {
                return Err(bad(
                    t,
                    format!("numel {} does not match shape {:?}", d.numel, d.shape),
                ));
            }
            let info = stored
                .get(name.as_str())
                .map(|&i| &shard.tensors[i])
                .ok_or_else(|| bad(t, "described but not stored".into()))?;
            let want = usize::try_from(d.numel).ok().map(padded_len);
            if info.dtype != Dtype::U8 || info.shape.len() != 1 || Some(info.len) != want {
                return Err(bad(
                    t,
                    format!(
                        "stored as {}{:?}, but {} bits pack into U8[{}]",
                        info.dtype,
                        info.shape,
                        d.numel,
                        want.map_or("?".into(), |w| w.to_string())
                    ),
                ));
            }
            entries.push(MaskEntry {
                name: name.clone(),
                shape: d.shape,
                dtype: d.dtype,
                numel: d.numel,
            });
        }
        if entries.len() != stored.len() {
            let described: std::collections::BTreeSet<&str> =
                entries.iter().map(|e| e.name.as_str()).collect();
            if let Some(extra) = stored.keys().find(|n| !described.contains(n.as_str())) {
                return Err(bad(Some(extra), "stored but not described".into()));
            }
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(MaskFile {
            path: path.to_path_buf(),
            entries,
            metadata: shard.metadata.clone(),
            shard,
            stored,
        })
    }

    /// The packed bits of entry `name` (exactly [`padded_len`] bytes), without copying.
    pub fn packed(&self, name: &str) -> Option<&[u8]> {
        let &i = self.stored.get(name)?;
        Some(self.shard.bytes(&self.shard.tensors[i]))
    }

    /// See [`Shard::check_unchanged`].
    pub fn check_unchanged(&self) -> Result<()> {
        self.shard.check_unchanged()
    }
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

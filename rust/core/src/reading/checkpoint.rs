//! A checkpoint: one or more validated shards, and where each tensor lives.
//!
//! Accepted forms (design §1): a single `.safetensors` file; a directory holding
//! `model.safetensors.index.json` (or exactly one other `*.safetensors.index.json`), or
//! `model.safetensors`, or only shards; or an index file named directly.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::safetensors::{Shard, TensorInfo};

/// A set of shards and a name -> (shard, tensor) map.
#[derive(Debug)]
pub struct Checkpoint {
    /// What the checkpoint is known by: the `.safetensors` or index file it was opened from;
    /// for a directory, its index file when it has one, else the directory itself.
    pub path: PathBuf,
    pub shards: Vec<Shard>,
    /// (shard, tensor) of every tensor, sorted by name: the names live once, in the shards'
    /// tensor descriptions (a million-tensor header pays for each name once, not twice).
    names: Vec<(u32, u32)>,
    /// MXFP4 weights stored as raw bytes (gpt-oss: `X_blocks`), by stored name: the same
    /// bytes seen as F4 elements ([`Checkpoint::get_value`]).
    mxfp4: BTreeMap<String, (usize, TensorInfo)>,
    /// For a remote checkpoint, the `config.json` beside it, when the server has one (a local
    /// checkpoint's is read from its folder by whoever needs it).
    pub config: Option<Vec<u8>>,
}

/// The F4 view of `blocks` when it is an MXFP4 weight stored as gpt-oss stores it: U8
/// `X_blocks` of shape `[..., G, 16]` (16 bytes, 32 FP4 codes, per block) beside U8 or E8M0
/// `X_scales` of shape `[..., G]`; the view has shape `[..., G * 32]` over the same bytes.
fn mxfp4_view(blocks: &TensorInfo, scales: Option<&TensorInfo>) -> Option<TensorInfo> {
    let scales = scales?;
    let (last, prefix) = blocks.shape.split_last()?;
    let scale_dtype = matches!(scales.dtype, Dtype::U8 | Dtype::F8E8M0);
    if blocks.dtype != Dtype::U8 || *last != 16 || prefix.is_empty() || !scale_dtype {
        return None;
    }
    if scales.shape.as_slice() != prefix {
        return None;
    }
    let mut shape = prefix.to_vec();
    let groups = shape.pop()?;
    shape.push(groups.checked_mul(32)?);
    Some(TensorInfo {
        dtype: Dtype::F4,
        numel: blocks.numel.checked_mul(2)?,
        shape,
        ..blocks.clone()
    })
}

#[derive(Deserialize)]
struct IndexFile {
    weight_map: HashMap<String, String>,
}

/// The undo journal of an in-place patch apply (`patch::apply_in_place`) inside a checkpoint
/// directory: while it is there the directory may mix two versions, and is refused.
pub const JOURNAL: &str = ".rlmask-apply.journal";

const INDEX_NAME: &str = "model.safetensors.index.json";
const SINGLE_NAME: &str = "model.safetensors";

/// Names of pickled PyTorch checkpoints in `dir` (for a helpful error), sorted, at most three.
fn pickle_files(dir: &Path) -> Vec<String> {
    let mut found: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".bin") || n.ends_with(".pt") || n.ends_with(".pth"))
        .collect();
    found.sort();
    found.truncate(3);
    found
}

/// `name` as a URL path segment: every byte but unreserved characters percent-encoded.
fn url_escape(name: &str) -> String {
    name.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Fails unless `path` is (or links to) a regular file that can be statted.
fn regular_file(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(Error::header(
            path,
            format!(
                "not a regular file ({})",
                crate::safetensors::file_kind(&meta)
            ),
        ));
    }
    Ok(())
}

/// The folders directly inside `dir` that hold safetensors files (a run's checkpoints), in
/// natural order (`checkpoint-25` before `checkpoint-100`).
fn checkpoint_folders(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter(|e| {
            std::fs::read_dir(e.path()).is_ok_and(|mut inner| {
                inner.any(|f| {
                    f.is_ok_and(|f| f.file_name().to_string_lossy().ends_with(".safetensors"))
                })
            })
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    found.sort_by(|a, b| crate::names::natural_cmp(a, b));
    found
}

/// Masks and patches are safetensors files too, but comparing them as checkpoints would report
/// figures over packed bits: refuse them, saying what they are.
fn not_an_rlmask_file(shard: &Shard) -> Result<()> {
    let (what, hint) = match shard.metadata.get("format").map(String::as_str) {
        Some("rlmask") => (
            "an rlmask mask file",
            " (inspect it with `rlmask mask info`)",
        ),
        Some("rlmask-patch") => ("an rlmask patch file", ""),
        _ => return Ok(()),
    };
    Err(Error::header(
        &shard.path,
        format!("is {what}, not a model checkpoint{hint}"),
    ))
}

impl Checkpoint {
    /// Opens every shard of the checkpoint at `path` and validates headers and index.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => Error::NotFound {
                path: path.to_path_buf(),
                reason: "no such file or directory".into(),
            },
            _ => Error::io(path, e),
        })?;
        if !meta.is_file() && !meta.is_dir() {
            return Err(Error::header(
                path,
                format!(
                    "not a checkpoint file or directory ({})",
                    crate::safetensors::file_kind(&meta)
                ),
            ));
        }
        let dir = if meta.is_dir() {
            path
        } else {
            path.parent().unwrap_or(Path::new("."))
        };
        let journal = dir.join(JOURNAL);
        if journal.exists() {
            return Err(Error::Changed {
                path: journal,
                reason: "an in-place patch apply was interrupted here, and the weights may mix \
                         two versions: run `rlmask patch recover` on the directory (it restores \
                         the weights from before it)"
                    .into(),
            });
        }
        if meta.is_file() {
            if path.to_string_lossy().ends_with(".json") {
                return Self::from_index(path);
            }
            return Self::from_shards(path, vec![path.to_path_buf()]);
        }
        let index = path.join(INDEX_NAME);
        if index.is_file() {
            return Self::from_index(&index);
        }
        let single = path.join(SINGLE_NAME);
        if single.is_file() {
            return Self::from_shards(path, vec![single]);
        }
        let mut shards = Vec::new();
        let mut indexes = Vec::new();
        for entry in std::fs::read_dir(path).map_err(|e| Error::io(path, e))? {
            let entry = entry.map_err(|e| Error::io(path, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let list = if name.ends_with(".safetensors.index.json") {
                &mut indexes
            } else if name.ends_with(".safetensors") {
                &mut shards
            } else {
                continue;
            };
            // A shard that cannot be read is an error naming it, never silently left out.
            let p = entry.path();
            regular_file(&p)?;
            list.push(p);
        }
        if indexes.len() == 1 {
            return Self::from_index(&indexes[0]);
        }
        if indexes.len() > 1 {
            indexes.sort();
            let names: Vec<String> = indexes
                .iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect();
            return Err(Error::NotFound {
                path: path.to_path_buf(),
                reason: format!(
                    "several index files ({}); name the one to use",
                    names.join(", ")
                ),
            });
        }
        if shards.is_empty() {
            let pickles = pickle_files(path);
            let runs = checkpoint_folders(path);
            let hint = if !runs.is_empty() {
                let shown: Vec<&str> = runs.iter().take(4).map(String::as_str).collect();
                let more = if runs.len() > 4 {
                    format!(", ... ({} in all)", runs.len())
                } else {
                    String::new()
                };
                let last = runs.last().expect("not empty");
                let dir = path.display();
                format!(
                    "; its folders {}{more} are checkpoints: it looks like a training run. \
                     Compare one checkpoint (rlmask diff BASE {dir}/{last}) or the whole run \
                     (rlmask trajectory BASE {dir})",
                    shown.join(", ")
                )
            } else if pickles.is_empty() {
                String::new()
            } else {
                format!(
                    "; it holds {} (PyTorch pickles, which rlmask never loads: they can run code); \
                     convert them to safetensors first",
                    pickles.join(", ")
                )
            };
            return Err(Error::NotFound {
                path: path.to_path_buf(),
                reason: format!(
                    "directory holds no {INDEX_NAME}, no {SINGLE_NAME} and no *.safetensors files{hint}"
                ),
            });
        }
        shards.sort();
        Self::from_shards(path, shards)
    }

    /// A checkpoint made of the shard files at `paths`.
    fn from_shards(root: &Path, paths: Vec<PathBuf>) -> Result<Checkpoint> {
        let shards = paths
            .iter()
            .map(|p| Shard::open(p))
            .collect::<Result<Vec<_>>>()?;
        Self::assemble(root, shards)
    }

    /// The checkpoint at `url`, read over HTTP(S) by range requests ([`crate::remote`]),
    /// each request carrying `headers`: a `.safetensors` file, an index file, or a folder
    /// holding `model.safetensors.index.json` or `model.safetensors` (a remote folder cannot
    /// be listed). Every header is fetched and validated; no tensor data is fetched until a
    /// pass reads it.
    pub fn open_url(url: &str, headers: Vec<(String, String)>) -> Result<Checkpoint> {
        let client = crate::remote::Client::new(headers);
        let shown = PathBuf::from(crate::remote::shown_url(url));
        let (path_part, query) = match url.find(['?', '#']) {
            Some(i) => url.split_at(i),
            None => (url, ""),
        };
        if !(path_part.starts_with("http://") || path_part.starts_with("https://")) {
            return Err(Error::NotFound {
                path: shown,
                reason: "not an http:// or https:// URL".into(),
            });
        }
        let open = |name: &str, folder: &str| {
            Shard::open_remote(&client, &format!("{folder}{}{query}", url_escape(name)))
        };
        let (folder, index) = if path_part.ends_with(".json") || path_part.ends_with(".safetensors")
        {
            let cut = path_part.rfind('/').map_or(0, |i| i + 1);
            (&path_part[..cut], Some(url.to_string()))
        } else {
            (path_part.trim_end_matches('/'), None)
        };
        let folder = if index.is_some() {
            folder.to_string()
        } else {
            format!("{folder}/")
        };
        let index_url = index.unwrap_or_else(|| format!("{folder}{INDEX_NAME}{query}"));
        let index_shown = PathBuf::from(crate::remote::shown_url(&index_url));
        let mut ckpt = if path_part.ends_with(".safetensors") {
            Self::assemble(&shown, vec![Shard::open_remote(&client, url)?])
        } else {
            match crate::remote::fetch_small(&client, &index_url)? {
                Some(text) => Self::indexed(&index_shown, &text, |_| Ok(()), |f| open(f, &folder)),
                None if path_part.ends_with(".json") => Err(Error::NotFound {
                    path: index_shown,
                    reason: "not found (HTTP 404)".into(),
                }),
                None => match open(SINGLE_NAME, &folder) {
                    Ok(shard) => Self::assemble(&shown, vec![shard]),
                    Err(Error::NotFound { .. }) => Err(Error::NotFound {
                        path: shown,
                        reason: format!(
                        "holds no {INDEX_NAME} and no {SINGLE_NAME} (a remote folder cannot be \
                         listed: name its index or .safetensors file)"
                    ),
                    }),
                    Err(e) => Err(e),
                },
            }
        }?;
        // Beside a file named directly (perhaps by a signed URL, whose query is that file's
        // alone), the config is read if it can be; beside a folder or index it must be.
        let config = crate::remote::fetch_small(&client, &format!("{folder}config.json{query}"));
        ckpt.config = match config {
            Err(_) if path_part.ends_with(".safetensors") => None,
            other => other?,
        };
        Ok(ckpt)
    }

    /// Bytes fetched over HTTP so far, all shards (0 for a local checkpoint).
    pub fn fetched(&self) -> u64 {
        self.shards.iter().map(Shard::fetched).sum()
    }

    /// A checkpoint made of the given shards; a tensor name may appear in one shard only.
    fn assemble(root: &Path, shards: Vec<Shard>) -> Result<Checkpoint> {
        for shard in &shards {
            not_an_rlmask_file(shard)?;
        }
        // u32 indices: a shard holds fewer than 2^32 tensors (its header is at most 100 MB).
        let mut names: Vec<(u32, u32)> = shards
            .iter()
            .enumerate()
            .flat_map(|(si, shard)| (0..shard.tensors.len()).map(move |ti| (si as u32, ti as u32)))
            .collect();
        let name_of = |&(s, t): &(u32, u32)| shards[s as usize].tensors[t as usize].name.as_str();
        names.sort_unstable_by(|x, y| name_of(x).cmp(name_of(y)).then(x.cmp(y)));
        // A shard's own names are unique (its header is checked), so a repeat is across shards.
        if let Some(w) = names.windows(2).find(|w| name_of(&w[0]) == name_of(&w[1])) {
            let (shard, other) = (&shards[w[1].0 as usize], &shards[w[0].0 as usize]);
            return Err(Error::tensor(
                &shard.path,
                name_of(&w[1]),
                format!("also present in {}", other.path.display()),
            ));
        }
        let mut ckpt = Checkpoint {
            path: root.to_path_buf(),
            shards,
            names,
            mxfp4: BTreeMap::new(),
            config: None,
        };
        let mut mxfp4 = BTreeMap::new();
        for name in ckpt.names() {
            let Some(stem) = name.strip_suffix("_blocks") else {
                continue;
            };
            let (Some(at), Some((_, blocks))) = (ckpt.position(name), ckpt.get(name)) else {
                continue;
            };
            let scales = ckpt.get(&format!("{stem}_scales")).map(|(_, t)| t);
            if let Some(view) = mxfp4_view(blocks, scales) {
                mxfp4.insert(name.to_string(), (ckpt.names[at].0 as usize, view));
            }
        }
        ckpt.mxfp4 = mxfp4;
        Ok(ckpt)
    }

    /// A checkpoint described by an index file, checked against its shards both ways.
    fn from_index(index_path: &Path) -> Result<Checkpoint> {
        let file_name = index_path.file_name().unwrap_or_default().to_string_lossy();
        if !file_name.ends_with(".index.json") && file_name.ends_with("config.json") {
            let dir = index_path.parent().unwrap_or(Path::new("."));
            return Err(Error::NotFound {
                path: index_path.to_path_buf(),
                reason: format!(
                    "a model's configuration, not its weights: pass the checkpoint's folder \
                     ({}) or its *.safetensors file",
                    dir.display()
                ),
            });
        }
        let text = std::fs::read(index_path).map_err(|e| Error::io(index_path, e))?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        Self::indexed(
            index_path,
            &text,
            |f| regular_file(&dir.join(f)),
            |f| Shard::open(&dir.join(f)),
        )
    }

    /// A checkpoint described by the index file `text` (read from `index_path`), checked
    /// against its shards both ways: `usable` checks that a shard named by the index can be
    /// opened (before any is), `open` opens it.
    fn indexed(
        index_path: &Path,
        text: &[u8],
        usable: impl Fn(&str) -> Result<()>,
        open: impl Fn(&str) -> Result<Shard> + Sync,
    ) -> Result<Checkpoint> {
        let index: IndexFile = serde_json::from_slice(text)
            .map_err(|e| Error::index(index_path, format!("not a valid index file: {e}")))?;
        let mut files: Vec<&String> = index.weight_map.values().collect();
        files.sort();
        files.dedup();
        for f in &files {
            let p = Path::new(f.as_str());
            let plain = p.components().count() == 1
                && matches!(p.components().next(), Some(std::path::Component::Normal(_)));
            if !plain {
                return Err(Error::index(
                    index_path,
                    format!("shard '{f}' must be a file name inside the checkpoint directory"),
                ));
            }
            if let Err(e) = usable(f) {
                let tensor = index
                    .weight_map
                    .iter()
                    .filter(|(_, v)| v == f)
                    .map(|(k, _)| k.as_str())
                    .min()
                    .unwrap_or("?");
                return Err(Error::index(
                    index_path,
                    format!(
                        "shard '{}' (holding tensor '{}') cannot be used: {e}",
                        crate::text::printable(f),
                        crate::text::printable(tensor)
                    ),
                ));
            }
        }
        // In parallel: a remote shard's header costs a round trip (DeepSeek-V3 has 163 shards).
        let shards = {
            use rayon::prelude::*;
            files
                .par_iter()
                .map(|f| open(f.as_str()))
                .collect::<Result<Vec<_>>>()?
        };
        let ckpt = Self::assemble(index_path, shards)?;
        // Every listed tensor is where the index says, and every stored tensor is listed.
        let mut listed: Vec<(&String, &String)> = index.weight_map.iter().collect();
        listed.sort();
        for (name, file) in listed {
            match ckpt.get(name) {
                None => {
                    return Err(Error::index(
                        index_path,
                        format!("tensor '{name}' is listed in '{file}', which does not hold it"),
                    ))
                }
                Some((shard, _)) => {
                    let actual = &shard.path;
                    if actual.file_name().map(|n| n.to_string_lossy()) != Some(file.into()) {
                        return Err(Error::index(
                            index_path,
                            format!(
                                "tensor '{name}' is listed in '{file}' but stored in '{}'",
                                actual.display()
                            ),
                        ));
                    }
                }
            }
        }
        if let Some(name) = ckpt.names().find(|n| !index.weight_map.contains_key(*n)) {
            let shard = ckpt.get(name).map(|(s, _)| s.path.display().to_string());
            return Err(Error::index(
                index_path,
                format!(
                    "tensor '{name}' is stored in '{}' but not listed in the index",
                    shard.unwrap_or_default()
                ),
            ));
        }
        Ok(ckpt)
    }

    /// The name of the `i`-th tensor in name order.
    fn name_at(&self, i: usize) -> &str {
        let (s, t) = self.names[i];
        &self.shards[s as usize].tensors[t as usize].name
    }

    /// Where `name` sits in name order.
    fn position(&self, name: &str) -> Option<usize> {
        let i = self.names.partition_point(|&(s, t)| {
            self.shards[s as usize].tensors[t as usize].name.as_str() < name
        });
        (i < self.names.len() && self.name_at(i) == name).then_some(i)
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        (0..self.names.len()).map(|i| self.name_at(i))
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// True when the checkpoint holds no tensor.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The shard holding `name` and the tensor's description.
    pub fn get(&self, name: &str) -> Option<(&Shard, &TensorInfo)> {
        self.position(name).map(|i| {
            let (s, t) = self.names[i];
            let shard = &self.shards[s as usize];
            (shard, &shard.tensors[t as usize])
        })
    }

    /// The tensor `name` as its values are read: MXFP4 weights stored as raw bytes (gpt-oss's
    /// `X_blocks`) as F4 elements, every other tensor as stored ([`Checkpoint::get`]).
    pub fn get_value(&self, name: &str) -> Option<(&Shard, &TensorInfo)> {
        match self.mxfp4.get(name) {
            Some((s, view)) => Some((&self.shards[*s], view)),
            None => self.get(name),
        }
    }

    /// True when `name` is stored.
    pub fn contains(&self, name: &str) -> bool {
        self.position(name).is_some()
    }
}

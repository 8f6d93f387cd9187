//! Applying and verifying patches: the chain checked by fingerprint, then the base streamed
//! into new files a piece at a time with each patch's entries written over it.

use super::fingerprint::Streaming;
use super::*;
use crate::atomic::Staged;
use std::os::unix::fs::FileExt;

/// A file written under a temporary name beside its target, put in place by
/// [`AtomicFile::finish`] ([`Staged::commit`]); removed if dropped unfinished.
pub(super) struct AtomicFile {
    path: PathBuf,
    staged: Staged,
    file: BufWriter<File>,
    len: u64,
    /// Bytes handed to the disk so far ([`start_writeback`]).
    handed: u64,
}

/// Bytes an [`AtomicFile`] collects before handing them to the disk: the disk writes while
/// the rest is assembled, and the final sync waits for the last stretch only.
const HAND_OFF: u64 = 8 << 20;

impl AtomicFile {
    pub(super) fn create(path: &Path) -> Result<AtomicFile> {
        let (staged, file) = Staged::file(path, "part")?;
        Ok(AtomicFile {
            path: path.to_path_buf(),
            staged,
            // Small pieces (headers, tables, padding) are gathered; a chunk's changes are
            // mostly larger and go to the file without a copy.
            file: BufWriter::with_capacity(64 << 10, file),
            len: 0,
            handed: 0,
        })
    }

    /// Hands what was written since the last time to the disk, once it is [`HAND_OFF`] bytes.
    fn hand_off(&mut self) -> Result<()> {
        if self.len - self.handed >= HAND_OFF {
            self.file
                .flush()
                .map_err(|e| Error::output(&self.path, e))?;
            start_writeback(self.file.get_ref(), self.handed, self.len - self.handed);
            self.handed = self.len;
        }
        Ok(())
    }

    pub(super) fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.file
            .write_all(bytes)
            .map_err(|e| Error::output(&self.path, e))?;
        self.len += bytes.len() as u64;
        self.hand_off()
    }

    /// Leaves the next `n` bytes to be written later ([`AtomicFile::write_at`]), handing
    /// what was written before them to the disk.
    pub(super) fn skip(&mut self, n: u64) -> Result<()> {
        let io = |e| Error::output(&self.path, e);
        self.file.flush().map_err(io)?;
        start_writeback(self.file.get_ref(), self.handed, self.len - self.handed);
        self.len += n;
        self.handed = self.len;
        self.file
            .seek(std::io::SeekFrom::Start(self.len))
            .map_err(io)?;
        Ok(())
    }

    /// Writes `bytes` at `offset`, in what was skipped ([`AtomicFile::skip`]).
    pub(super) fn write_at(&mut self, offset: u64, bytes: &[u8]) -> Result<()> {
        self.file
            .get_ref()
            .write_all_at(bytes, offset)
            .map_err(|e| Error::output(&self.path, e))
    }

    pub(super) fn finish(self) -> Result<u64> {
        let file = self
            .file
            .into_inner()
            .map_err(|e| Error::output(&self.path, e.into_error()))?;
        self.staged.commit(Some(file))?;
        Ok(self.len)
    }
}

/// Checks that `patches` apply to `base` in this order, from their descriptions alone: the
/// first describes exactly `base`'s tensors with their shapes and dtypes, and each next one
/// starts from the fingerprints the one before ends at.
pub(super) fn check_chain(base: &Checkpoint, patches: &[&Patch]) -> Result<()> {
    let Some(first) = patches.first() else {
        return Err(Error::InvalidArgument("no patch to apply".into()));
    };
    let names: BTreeSet<&str> = base.names().collect();
    let described: BTreeSet<&str> = first.entries.keys().map(String::as_str).collect();
    if let Some(n) = names.symmetric_difference(&described).next() {
        let (where_, other) = if names.contains(n) {
            ("base", "the patch")
        } else {
            ("the patch", "base")
        };
        return Err(Error::Pairing {
            reason: format!(
                "patch {} was not made for {}: tensor '{n}' is in {where_} but not in {other}",
                first.path.display(),
                base.path.display()
            ),
        });
    }
    // Every patch of the chain describes base's shapes and dtypes (a later one's entries are
    // read with base's element size: one that says otherwise is refused here, not trusted).
    for p in patches {
        for (name, e) in &p.entries {
            let Some((_, t)) = base.get(name) else {
                continue; // a later patch's names are checked against the one before
            };
            if t.shape != e.shape || t.dtype.to_string() != e.dtype {
                return Err(Error::Mismatch {
                    tensor: name.clone(),
                    detail: format!(
                        "{} {:?} in base but {} {:?} in patch {}",
                        t.dtype,
                        t.shape,
                        e.dtype,
                        e.shape,
                        p.path.display()
                    ),
                });
            }
        }
    }
    for (k, pair) in patches.windows(2).enumerate() {
        let (p, q) = (&pair[0], &pair[1]);
        if p.scheme != q.scheme {
            return Err(Error::Pairing {
                reason: format!(
                    "patch {} ({}) and patch {} ({}) carry fingerprints of different kinds \
                     (versions {} and {}): the chain cannot be checked across them; create the \
                     older patch again with this rlmask",
                    k + 1,
                    p.path.display(),
                    k + 2,
                    q.path.display(),
                    p.metadata.get("version").map_or("?", String::as_str),
                    q.metadata.get("version").map_or("?", String::as_str),
                ),
            });
        }
        for (name, e) in &p.entries {
            let next = q.entries.get(name);
            if next.is_none_or(|f| f.base != e.tuned) {
                return Err(Error::Pairing {
                    reason: format!(
                        "patch {} ({}) does not start where patch {} ({}) ends, at tensor \
                         '{name}': a patch is missing, repeated or out of order",
                        k + 2,
                        q.path.display(),
                        k + 1,
                        p.path.display()
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Streams one tensor of `base` through `patches` in pieces: each piece is handed to `sink`
/// after every patch has written over it; with `check`, checks `base`'s fingerprint against
/// the first patch and the result's against the last, and dense entries' stated counts (a
/// second pass over what one pass checked already goes without).
pub(super) fn stream_tensor(
    name: &str,
    bytes: &[u8],
    dtype: Dtype,
    patches: &[&Patch],
    path: &Path,
    check: bool,
    sink: &mut dyn FnMut(&[u8]) -> Result<()>,
) -> Result<()> {
    let size = dtype.size().max(1);
    let entries: Vec<&Entry> = patches.iter().map(|p| &p.entries[name]).collect();
    let mut walks: Vec<Option<Changes>> = patches
        .iter()
        .zip(&entries)
        .map(|(p, e)| {
            matches!(e.form, Form::Sparse | Form::Compact).then(|| Changes::new(p, name, e))
        })
        .collect();
    let last = entries[entries.len() - 1];
    let (mut before, mut after) = (
        Streaming::like(&entries[0].base),
        Streaming::like(&last.tuned),
    );
    // Elements each dense entry actually changes, checked against the count it states.
    let mut dense_changed = vec![0u64; patches.len()];
    let mut buf = vec![0u8; PIECE.min(bytes.len())];
    let piece_len = (PIECE / size) * size;
    let mut at = 0;
    while at < bytes.len() {
        let n = piece_len.min(bytes.len() - at);
        let piece = &mut buf[..n];
        piece.copy_from_slice(&bytes[at..at + n]);
        if check {
            before.update(piece);
        }
        let (first, end) = ((at / size) as u64, ((at + n) / size) as u64);
        for (((p, e), walk), counted) in patches
            .iter()
            .zip(&entries)
            .zip(&mut walks)
            .zip(&mut dense_changed)
        {
            match (e.form, walk) {
                (Form::Sparse | Form::Compact, Some(w)) => w.write_until(first, end, piece)?,
                (Form::Dense, _) => {
                    let (_, bytes) = p.stored(&format!("{name}.dense")).expect("validated");
                    let new = &bytes[at..at + n];
                    *counted += piece
                        .chunks_exact(size)
                        .zip(new.chunks_exact(size))
                        .filter(|(old, new)| old != new)
                        .count() as u64;
                    piece.copy_from_slice(new);
                }
                _ => {}
            }
        }
        if check {
            after.update(piece);
        }
        sink(piece)?;
        at += n;
    }
    for walk in walks.iter().flatten() {
        walk.finish()?;
    }
    if !check {
        return Ok(());
    }
    if !before.matches(&entries[0].base) {
        return Err(Error::Pairing {
            reason: format!(
                "tensor '{name}' of {} is not the one patch {} was made from (its fingerprint \
                 differs): a patch applies only to the checkpoint it was created against",
                path.display(),
                patches[0].path.display()
            ),
        });
    }
    for ((p, e), counted) in patches.iter().zip(&entries).zip(&dense_changed) {
        if e.form == Form::Dense && *counted != e.changed {
            return Err(corrupt(
                &p.path,
                Some(name),
                format!(
                    "corrupt patch: the tensor is stored whole and said to change {} elements, \
                     but its data changes {counted}",
                    e.changed
                ),
            ));
        }
    }
    if !after.matches(&last.tuned) {
        return Err(corrupt(
            &patches[patches.len() - 1].path,
            Some(name),
            "corrupt patch: the patched tensor does not have the fingerprint the patch \
             promises",
        ));
    }
    Ok(())
}

/// Applies `patches` in order to `base` and writes the result as a checkpoint directory
/// `out` (which must not exist, or be empty): `base`'s shards with the same headers, its index
/// and the other files of its directory, every tensor patched. `base` is never modified; `out`
/// appears complete or not at all.
pub fn apply(base: &Checkpoint, patches: &[&Patch], out: &Path, progress: &Progress) -> Result<()> {
    check_chain(base, patches)?;
    if out.exists()
        && std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true)
    {
        return Err(Error::output(
            out,
            std::io::Error::other("exists and is not an empty directory"),
        ));
    }
    // The rebuilt checkpoint's folder, removed with everything in it unless put in place.
    let staged = Staged::folder(out, "apply")?;
    let tmp = staged.path().to_path_buf();
    let total: u64 = base
        .shards
        .iter()
        .map(|s| s.file_bytes().len() as u64)
        .sum();
    progress.total.store(total, Ordering::Relaxed);

    // The shards' files at their full length, the bytes around the tensors (header, padding)
    // copied here; every tensor is then patched by whichever worker takes it and written at
    // its place, so a checkpoint of one shard is patched on every core too, and its writing
    // to disk is started as each tensor is done (the final sync waits for the rest only).
    let mut files = Vec::with_capacity(base.shards.len());
    for shard in &base.shards {
        let name = shard
            .path
            .file_name()
            .ok_or_else(|| Error::output(out, std::io::Error::other("a shard has no name")))?;
        let target = tmp.join(name);
        let file = File::create(&target).map_err(|e| Error::output(out, e))?;
        let all = shard.file_bytes();
        file.set_len(all.len() as u64)
            .map_err(|e| Error::output(out, e))?;
        let mut tensors: Vec<&TensorInfo> = shard.tensors.iter().collect();
        tensors.sort_by_key(|t| t.offset);
        let mut around = Vec::new();
        let mut at = 0;
        for t in tensors {
            around.push(at..t.offset.max(at));
            at = at.max(t.offset + t.len);
        }
        around.push(at..all.len());
        for r in around.into_iter().filter(|r| !r.is_empty()) {
            file.write_all_at(&all[r.clone()], r.start as u64)
                .map_err(|e| Error::output(out, e))?;
            progress.done.fetch_add(r.len() as u64, Ordering::Relaxed);
        }
        files.push((file, target));
    }
    let work: Vec<(usize, &TensorInfo)> = base
        .shards
        .iter()
        .enumerate()
        .flat_map(|(k, s)| s.tensors.iter().map(move |t| (k, t)))
        .collect();
    work.par_iter().try_for_each(|&(k, t)| {
        let (shard, file) = (&base.shards[k], &files[k].0);
        let mut at = t.offset as u64;
        let mut write = |bytes: &[u8]| -> Result<()> {
            progress.check()?;
            progress
                .done
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
            file.write_all_at(bytes, at)
                .map_err(|e| Error::output(out, e))?;
            at += bytes.len() as u64;
            Ok(())
        };
        let bytes = shard.bytes(t);
        stream_tensor(
            &t.name, bytes, t.dtype, patches, &base.path, true, &mut write,
        )?;
        start_writeback(file, t.offset as u64, t.len as u64);
        Ok(())
    })?;
    for (shard, (file, target)) in base.shards.iter().zip(&files) {
        shard.check_faults()?;
        shard.check_unchanged()?;
        file.sync_all().map_err(|e| Error::output(out, e))?;
        // The rebuilt shard is as private as the base's (a 0600 base stays 0600).
        let mode = std::fs::metadata(&shard.path).map_err(|e| Error::io(&shard.path, e))?;
        std::fs::set_permissions(target, mode.permissions()).map_err(|e| Error::output(out, e))?;
    }
    // The rest of a checkpoint directory that describes the model: its index, config,
    // generation config and tokenizer files, never a trainer's state (optimizer, scheduler,
    // RNG), which belongs to the run that made the base. std::fs::copy keeps permissions.
    if let Some(dir) = base_dir(base) {
        let mode = std::fs::metadata(&dir).map_err(|e| Error::io(&dir, e))?;
        std::fs::set_permissions(&tmp, mode.permissions()).map_err(|e| Error::output(out, e))?;
        let shards: BTreeSet<&std::ffi::OsStr> = base
            .shards
            .iter()
            .filter_map(|s| s.path.file_name())
            .collect();
        for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
            let entry = entry.map_err(|e| Error::io(&dir, e))?;
            let p = entry.path();
            let model_file = entry.file_name().to_str().is_some_and(is_model_file);
            if p.is_file() && model_file && !shards.contains(entry.file_name().as_os_str()) {
                std::fs::copy(&p, tmp.join(entry.file_name()))
                    .map_err(|e| Error::output(out, e))?;
            }
        }
    }
    progress.check()?; // the last moment a cancel leaves nothing behind
    if out.exists() {
        std::fs::remove_dir(out).map_err(|e| Error::output(out, e))?;
    }
    crate::atomic::sync_dir(&tmp); // the files' names in it, before it is put in place
    staged.commit(None)
}

/// Starts writing `len` bytes of `file` from `offset` to disk without waiting for them (Linux's
/// `sync_file_range`), so that the disk works while the pass goes on; the `sync_all` that
/// makes the file durable follows. Only a hint: an error shows at that sync.
pub(super) fn start_writeback(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a system call on a descriptor `file` owns for the length of the call; it
        // reads and writes no memory of this process.
        unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
}

/// Whether a file beside the shards describes the model (and so belongs in a checkpoint that
/// `apply` rebuilds): the index, `config.json`, `generation_config.json`, tokenizer and
/// processor files. Training state (`optimizer.pt`, `scheduler.pt`, `rng_state.pth`,
/// `trainer_state.json`, `training_args.bin`) and anything else is not copied.
pub fn is_model_file(name: &str) -> bool {
    const EXACT: &[&str] = &[
        "config.json",
        "generation_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "merges.txt",
        "preprocessor_config.json",
        "processor_config.json",
        "spiece.model",
        "sentencepiece.bpe.model",
    ];
    EXACT.contains(&name)
        || name.ends_with(".safetensors.index.json")
        || name.starts_with("tokenizer")
        || name.starts_with("vocab.")
        || name.starts_with("chat_template.")
}

/// The directory of a checkpoint opened from a directory or an index file (whose other files
/// belong to it); None for a single `.safetensors` file named directly.
fn base_dir(base: &Checkpoint) -> Option<PathBuf> {
    if base.path.is_dir() {
        return Some(base.path.clone());
    }
    if base.path.extension().is_some_and(|e| e == "json") {
        return base.path.parent().map(Path::to_path_buf);
    }
    None
}

/// Checks, without writing anything, that `patch` applies to `base` and gives the tensors it
/// promises, and when `tuned` is given that those are `tuned`'s (by fingerprint of its bytes).
pub fn verify(
    base: &Checkpoint,
    patch: &Patch,
    tuned: Option<&Checkpoint>,
    progress: &Progress,
) -> Result<()> {
    let patches = &[patch];
    check_chain(base, patches)?;
    let names: Vec<&str> = base.names().collect();
    names.par_iter().try_for_each(|name| {
        progress.check()?;
        let (shard, t) = base.get(name).expect("listed");
        stream_tensor(
            name,
            shard.bytes(t),
            t.dtype,
            patches,
            &base.path,
            true,
            &mut |_| Ok(()),
        )?;
        if let Some(c) = tuned {
            let (ts, tt) = c.get(name).ok_or_else(|| Error::Pairing {
                reason: format!("tensor '{name}' is not in {}", c.path.display()),
            })?;
            if !matches(ts.bytes(tt), &patch.entries[*name].tuned) {
                return Err(Error::Pairing {
                    reason: format!(
                        "tensor '{name}' of {} is not what patch {} gives",
                        c.path.display(),
                        patch.path.display()
                    ),
                });
            }
        }
        Ok(())
    })
}

//! Memory-mapped safetensors files with a fully validated header.
//!
//! Layout of a file: an 8-byte little-endian header length `n`, `n` bytes of JSON (an object
//! mapping tensor names to `{dtype, shape, data_offsets}` plus an optional `__metadata__` map of
//! strings), then the data buffer. Offsets are relative to the buffer and must tile it exactly.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::dtype::Dtype;
use crate::error::{Error, Result};
use crate::guard;
use crate::remote::{Client, Halt, Remote};

/// Largest header we accept (the official library's limit).
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// One tensor of a shard, validated against the file it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<u64>,
    pub numel: u64,
    /// Absolute byte offset of the first element in the file.
    pub offset: usize,
    /// Length in bytes.
    pub len: usize,
}

/// A mapped safetensors file. Views handed to other owners (numpy arrays) keep the whole
/// checkpoint, and so the map, alive through an `Arc` of the checkpoint.
pub struct Shard {
    pub path: PathBuf,
    pub tensors: Vec<TensorInfo>,
    pub metadata: BTreeMap<String, String>,
    stamp: Stamp,
    // Declared before `mmap` so that the range is unregistered before it is unmapped.
    guard: guard::Guard,
    mmap: Mmap,
    /// For a shard read over HTTP: what of it has been fetched into the in-memory file that
    /// `mmap` maps (see [`crate::remote`]).
    remote: Option<Box<Remote>>,
}

/// Size and modification time of a file when it was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime: Option<std::time::SystemTime>,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        Stamp {
            len: meta.len(),
            mtime: meta.modified().ok(),
        }
    }
}

/// What a non-regular file is, for messages.
pub(crate) fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_socket() {
            return "a socket";
        }
        if t.is_block_device() || t.is_char_device() {
            return "a device";
        }
    }
    if meta.is_dir() {
        "a directory"
    } else {
        "not a plain file"
    }
}

/// File extensions of PyTorch pickles, which rlmask never loads.
pub(crate) const PICKLE_EXTENSIONS: [&str; 5] = [".bin", ".pt", ".pth", ".ckpt", ".pkl"];

/// A header that fails to parse may belong to a file of another kind: say which, instead of
/// reporting the bytes of a pickle as a bad header length.
fn explain_other_format(path: &Path, bytes: &[u8], err: Error) -> Error {
    // Only a header that could not be read at all: a safetensors header with a defect in one
    // entry keeps its precise error.
    if !matches!(err, Error::Header { .. }) {
        return err;
    }
    let name = path.to_string_lossy();
    let pickle = (bytes.len() >= 2 && bytes[0] == 0x80 && (2..=5).contains(&bytes[1]))
        || bytes.starts_with(b"PK\x03\x04")
        || PICKLE_EXTENSIONS.iter().any(|e| name.ends_with(e));
    if pickle {
        return Error::header(
            path,
            "is a PyTorch pickle (torch.save format), not a safetensors file; rlmask never loads \
             pickles (they can run code): convert it to safetensors first",
        );
    }
    if bytes.starts_with(b"GGUF") {
        return Error::header(path, "is a GGUF file, not a safetensors file");
    }
    err
}

/// [`Shard::check_unchanged`] of every distinct shard in `shards`: a pass holds one reference
/// per tensor, and a file needs one `stat` however many of its tensors were read. Local files
/// in their order; remote ones (a request each) all at once.
pub fn check_all_unchanged<'a>(shards: impl IntoIterator<Item = &'a Shard>) -> Result<()> {
    let mut seen = HashSet::new();
    let mut remote = Vec::new();
    for shard in shards {
        if seen.insert(std::ptr::from_ref(shard)) {
            if shard.is_remote() {
                remote.push(shard);
            } else {
                shard.check_unchanged()?;
            }
        }
    }
    use rayon::prelude::*;
    remote.par_iter().try_for_each(|s| s.check_unchanged())
}

impl fmt::Debug for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shard")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl Shard {
    /// Maps `path` and validates its whole header before any tensor data is read.
    pub fn open(path: &Path) -> Result<Shard> {
        // Stat before opening: opening a FIFO would block until a writer appears.
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            return Err(Error::header(
                path,
                format!("not a regular file ({})", file_kind(&meta)),
            ));
        }
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        if meta.len() < 8 {
            return Err(Error::header(
                path,
                format!(
                    "file is {} bytes, too short for the 8-byte header length",
                    meta.len()
                ),
            ));
        }
        // SAFETY: the map is read-only and private to this process, so nothing we do writes
        // through it. Another process may still truncate or rewrite the file while it is
        // mapped: a read past the new end would raise SIGBUS, which the guard registered
        // below turns into zero pages and a `faulted` mark that every reader checks before it
        // reports anything (see `guard`); a rewrite in place is caught by the size and
        // modification-time check of `check_unchanged`.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::mapped(path.to_path_buf(), mmap, Stamp::of(&meta), None)
    }

    /// Opens the safetensors file at `url` over HTTP(S) ([`crate::remote`]): fetches and
    /// validates its whole header, and nothing else, as [`Shard::open`] reads a local one.
    pub fn open_remote(client: &std::sync::Arc<Client>, url: &str) -> Result<Shard> {
        let (remote, file) = Remote::open(client, url)?;
        let path = remote.shown().to_path_buf();
        // SAFETY: the map is read-only and of an anonymous in-memory file that only this
        // shard's `Remote` writes to, with `pwrite`, and only in ranges that no reader reads
        // yet: a pass reads a range only after `Shard::ensure` returned for it, and bytes are
        // written only into ranges not yet fetched (`Remote::ensure` marks them busy first)
        // and dropped only once every item reading them is done. Its size is fixed, so no read
        // of the map can fault; a range not fetched reads as zeros, which is why every reader
        // ensures its bytes first.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let never = || false;
        // The header's length, then the header (a length past the limit is refused by the
        // parse, without fetching it).
        remote.ensure(0, 8, &never)?;
        let n = u64::from_le_bytes(mmap[..8].try_into().expect("8 bytes"));
        if n <= MAX_HEADER_LEN {
            remote.ensure(0, 8 + n as usize, &never)?;
        }
        let stamp = Stamp {
            len: mmap.len() as u64,
            mtime: None,
        };
        Self::mapped(path, mmap, stamp, Some(Box::new(remote)))
    }

    /// A shard over `mmap`, its header parsed and validated.
    fn mapped(
        path: PathBuf,
        mmap: Mmap,
        stamp: Stamp,
        remote: Option<Box<Remote>>,
    ) -> Result<Shard> {
        let path = path.as_path();
        let guard = guard::register(mmap.as_ptr(), mmap.len());
        let (tensors, metadata) =
            parse_header(path, &mmap).map_err(|e| explain_other_format(path, &mmap, e))?;
        // Tensor data is read front to back: ask for generous read-ahead on cold files.
        #[cfg(unix)]
        let _ = mmap.advise(memmap2::Advice::Sequential);
        // The header is parsed and never read again: its pages leave this process's resident
        // set (a hostile header of 100 MB would otherwise stay resident beside its parse).
        #[cfg(unix)]
        {
            let header_end = tensors.iter().map(|t| t.offset).min().unwrap_or(mmap.len());
            let whole_pages = header_end - header_end % 4096;
            if whole_pages > 0 {
                // SAFETY: the map is read-only and never written through, so MADV_DONTNEED only
                // drops page-table entries of file-backed pages: a later access re-reads the
                // same bytes from the file (nothing borrows the header: `parse_header` returned
                // owned values), and a truncated file faults into the guard as any read does.
                let _ = unsafe {
                    mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, 0, whole_pages)
                };
                if let Some(r) = &remote {
                    r.release(0, whole_pages);
                }
            }
        }
        Ok(Shard {
            path: path.to_path_buf(),
            tensors,
            metadata,
            stamp,
            guard,
            mmap,
            remote,
        })
    }

    /// Whether the shard is read over HTTP.
    pub fn is_remote(&self) -> bool {
        self.remote.is_some()
    }

    /// For a remote shard, the server's `ETag` of the file (every response is checked
    /// against it); `None` for a local file or a server that gives none.
    pub fn etag(&self) -> Option<&str> {
        self.remote.as_ref().and_then(|r| r.etag())
    }

    /// Bytes fetched over HTTP so far (0 for a local file).
    pub fn fetched(&self) -> u64 {
        self.remote
            .as_ref()
            .map_or(0, |r| r.fetched.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Makes `len` bytes from `offset` readable: for a remote shard, fetches them (or waits
    /// for the thread fetching them); for a local file, nothing. Every reader of a remote
    /// shard's bytes calls it first (a range not fetched would read as zeros).
    pub fn ensure(&self, offset: usize, len: usize, halt: Halt) -> Result<()> {
        match &self.remote {
            Some(r) => r.ensure(offset, len, halt),
            None => Ok(()),
        }
    }

    /// The bytes of one tensor, fetched first when the shard is remote ([`Shard::ensure`]).
    pub fn read(&self, t: &TensorInfo) -> Result<&[u8]> {
        self.ensure(t.offset, t.len, &|| false)?;
        Ok(self.bytes(t))
    }

    /// [`Shard::read`], the bytes of a remote shard kept for as long as the shard lives,
    /// whatever a pass releases around them: for scales that every worker reads, and views
    /// handed to Python.
    pub fn pinned(&self, t: &TensorInfo) -> Result<&[u8]> {
        if let Some(r) = &self.remote {
            r.pin(t.offset, t.len)?;
        }
        Ok(self.bytes(t))
    }

    /// Fails when a read of this file's map faulted: the file was truncated while mapped, and
    /// what was read from it past the new end is zeros (see [`guard`]). One atomic load.
    pub fn check_faults(&self) -> Result<()> {
        if self.guard.faulted() {
            return Err(Error::Changed {
                path: self.path.clone(),
                reason: "the file was truncated while it was being read; no figures from it \
                         are reported"
                    .into(),
            });
        }
        Ok(())
    }

    /// [`Shard::check_faults`], then fails when the file's size or modification time differ
    /// from when it was opened: figures read from it may mix two versions of the file.
    pub fn check_unchanged(&self) -> Result<()> {
        self.check_faults()?;
        if let Some(r) = &self.remote {
            // Every response was checked against the size and ETag seen on opening; one more
            // request says whether the file is still that one.
            r.check()?;
            return r.revalidate();
        }
        let changed = |reason: String| Error::Changed {
            path: self.path.clone(),
            reason,
        };
        let now = std::fs::metadata(&self.path).map_err(|e| {
            changed(format!(
                "the file disappeared or became unreadable while it was being read ({e})"
            ))
        })?;
        let stamp = Stamp::of(&now);
        if stamp != self.stamp {
            return Err(changed(format!(
                "the file changed while it was being read (size {} -> {} bytes{}); no figures \
                 from it are reported",
                self.stamp.len,
                stamp.len,
                if stamp.mtime != self.stamp.mtime {
                    ", modified"
                } else {
                    ""
                }
            )));
        }
        Ok(())
    }

    /// The whole file, header included.
    pub fn file_bytes(&self) -> &[u8] {
        &self.mmap[..]
    }

    /// The bytes of one tensor of this shard.
    pub fn bytes(&self, t: &TensorInfo) -> &[u8] {
        &self.mmap[t.offset..t.offset + t.len]
    }

    /// How the kernel reads this file ahead of page faults: generously for a pass that reads
    /// it front to back (`sequential`, the default), not at all for one that reads scattered
    /// blocks (a sampled diff), which would otherwise read most of the file to use 1% of it.
    /// A hint: failures are ignored.
    pub fn set_sequential(&self, sequential: bool) {
        #[cfg(unix)]
        let _ = self.mmap.advise(if sequential {
            memmap2::Advice::Sequential
        } else {
            memmap2::Advice::Random
        });
        #[cfg(not(unix))]
        let _ = sequential;
    }

    /// Brings `len` bytes of the file from `offset` into the page cache and this process's
    /// page tables before a pass gets there, for [`crate::readahead`]: on Linux one
    /// synchronous `MADV_POPULATE_READ`, elsewhere an asynchronous `MADV_WILLNEED`. A hint:
    /// failures are ignored (a read of a truncated file is reported by the pass's fault check).
    /// A remote shard fetches the bytes instead, while `wanted` says they still are (see
    /// [`Remote::fetch_if`]) and until `halt` says to stop; a failure is kept and reported by
    /// the next [`Shard::ensure`].
    pub fn read_ahead(&self, offset: usize, len: usize, halt: Halt, wanted: &dyn Fn() -> bool) {
        let len = len.min(self.mmap.len().saturating_sub(offset));
        if len == 0 {
            return;
        }
        if let Some(r) = &self.remote {
            let _ = r.fetch_if(offset, len, halt, wanted);
            return;
        }
        #[cfg(target_os = "linux")]
        let _ = self
            .mmap
            .advise_range(memmap2::Advice::PopulateRead, offset, len);
        #[cfg(all(unix, not(target_os = "linux")))]
        let _ = self
            .mmap
            .advise_range(memmap2::Advice::WillNeed, offset, len);
    }

    /// Drops this process's page-table entries for the whole pages inside `len` bytes from
    /// `offset` once a pass is done with them (`MADV_DONTNEED`; the file's pages stay in the
    /// page cache). Unmapping 2 GB of populated pages at the end of a pass took about 0.08 s
    /// on one thread; done behind the pass in aligned blocks ([`crate::readahead`]) it is
    /// spread over the workers, and the pages of a pair larger than memory are no longer held
    /// by this process. A later read of the range faults the same bytes back in. A hint:
    /// failures are ignored.
    /// A remote shard drops the fetched bytes ([`crate::remote::Remote::release`]).
    pub fn release(&self, offset: usize, len: usize) {
        if let Some(r) = &self.remote {
            r.release(offset, len);
            return;
        }
        #[cfg(unix)]
        {
            const PAGE: usize = 4096;
            let start = offset.div_ceil(PAGE) * PAGE;
            let end = (offset + len).min(self.mmap.len()) / PAGE * PAGE;
            if end > start {
                // SAFETY: the map is private and read-only and nothing writes through it, so
                // `MADV_DONTNEED` discards no data: it only removes page-table entries, and the
                // next read of the range (through a slice still borrowed elsewhere, or a
                // neighbouring chunk sharing no page with this range) faults the file's bytes
                // back in, or raises SIGBUS on a truncated file, which `guard` handles as for
                // any read.
                let _ = unsafe {
                    self.mmap.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        start,
                        end - start,
                    )
                };
            }
        }
        #[cfg(not(unix))]
        let _ = (offset, len);
    }

    /// Whether `len` bytes from `offset` look cached: one page in every 64 (and the last)
    /// is in the page cache (`mincore`, on Linux; elsewhere `false`, not known). A sample,
    /// because asking for every page of a large file costs tens of milliseconds; a stretch
    /// taken for cached that is not is only read by the pass itself.
    pub(crate) fn resident(&self, offset: usize, len: usize) -> bool {
        if let Some(r) = &self.remote {
            return r.holds(offset, len);
        }
        #[cfg(target_os = "linux")]
        {
            const PAGE: usize = 4096;
            let end = (offset + len).min(self.mmap.len());
            let first = offset / PAGE;
            let last = end.div_ceil(PAGE);
            (first..last)
                .step_by(64)
                .chain((last > first).then(|| last - 1))
                .all(|page| {
                    let mut v = 0u8;
                    // SAFETY: the page lies inside this process's live mapping of the file
                    // (`mmap` outlives the call; `page * PAGE < end <= mmap.len()`), its
                    // address is page-aligned (the map's start is), and `v` holds the one
                    // byte that mincore(2) writes for a one-page range.
                    let rc = unsafe {
                        libc::mincore(
                            self.mmap.as_ptr().add(page * PAGE) as *mut libc::c_void,
                            PAGE.min(self.mmap.len() - page * PAGE),
                            &mut v,
                        )
                    };
                    rc == 0 && v & 1 == 1
                })
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = (offset, len);
            false
        }
    }
}

/// Refuses to write a file whose header of `len` bytes (describing `tensors` tensors) no
/// safetensors reader would open: past [`MAX_HEADER_LEN`], rlmask's and the official reader
/// refuse it. Writers call it before they write anything.
pub fn check_header_len(out: &Path, len: u64, tensors: usize) -> Result<()> {
    if len > MAX_HEADER_LEN {
        return Err(Error::output(
            out,
            std::io::Error::other(format!(
                "its header would be {len} bytes for {tensors} tensors, over the {MAX_HEADER_LEN} \
                 bytes that safetensors readers accept; nothing was written (select fewer \
                 tensors with --include / include=)"
            )),
        ));
    }
    Ok(())
}

/// A safetensors file of 1-D U8 tensors being written: created under a temporary name in the
/// target's directory, sized and memory-mapped, filled through [`U8FileWriter::slices`] (each
/// tensor padded with zeros to a multiple of 8 bytes, every tensor 8-byte aligned), then synced
/// and renamed over the target by [`U8FileWriter::finish`]. Dropped unfinished (an error, a
/// cancellation), it removes the temporary file and leaves the target untouched.
pub struct U8FileWriter {
    path: PathBuf,
    /// The temporary file: removed if the writer is dropped unfinished.
    staged: crate::atomic::Staged,
    file: File,
    map: memmap2::MmapMut,
    spans: Vec<(usize, usize)>,
}

impl U8FileWriter {
    /// Creates the temporary file with its header for `tensors` (name, length in bytes).
    pub fn create(
        path: &Path,
        tensors: &[(&str, usize)],
        metadata: &BTreeMap<String, String>,
    ) -> Result<U8FileWriter> {
        let mut header = serde_json::Map::new();
        if !metadata.is_empty() {
            header.insert(
                "__metadata__".into(),
                serde_json::to_value(metadata).expect("strings"),
            );
        }
        let mut lens = Vec::with_capacity(tensors.len());
        let mut offset = 0u64;
        for (name, len) in tensors {
            let len = len.div_ceil(8) as u64 * 8;
            let entry = serde_json::json!({"dtype": "U8", "shape": [len], "data_offsets": [offset, offset + len]});
            if header.insert(name.to_string(), entry).is_some() || *name == "__metadata__" {
                return Err(Error::InvalidArgument(format!(
                    "tensor name '{name}' given twice or reserved"
                )));
            }
            lens.push(len as usize);
            offset += len;
        }
        let mut text = serde_json::to_vec(&header).expect("serialisable");
        text.resize(text.len().div_ceil(8) * 8, b' ');
        check_header_len(path, text.len() as u64, tensors.len())?;
        let data_start = 8 + text.len();

        let (staged, file) = crate::atomic::Staged::file(path, "part")?;
        let total = data_start as u64 + offset;
        let open = || -> std::io::Result<memmap2::MmapMut> {
            reserve(&file, total)?;
            // SAFETY: the file was just created exclusively (O_EXCL) under a name unique to
            // this process and call, and only this writer maps it; nothing else reads or
            // resizes it while the map lives. Its blocks were reserved above, so writing
            // through the map cannot run out of space (which would raise SIGBUS).
            let mut map = unsafe { memmap2::MmapMut::map_mut(&file)? };
            map[..8].copy_from_slice(&(text.len() as u64).to_le_bytes());
            map[8..data_start].copy_from_slice(&text);
            Ok(map)
        };
        // Dropped on an error: the staged file goes with it.
        let map = open().map_err(|e| Error::output(path, e))?;
        let mut spans = Vec::with_capacity(lens.len());
        let mut at = data_start;
        for len in lens {
            spans.push((at, len));
            at += len;
        }
        Ok(U8FileWriter {
            path: path.to_path_buf(),
            staged,
            file,
            map,
            spans,
        })
    }

    /// One disjoint, zero-filled slice per tensor, in the order given to `create`.
    pub fn slices(&mut self) -> Vec<&mut [u8]> {
        let mut rest: &mut [u8] = &mut self.map[..];
        let mut cursor = 0;
        let mut out = Vec::with_capacity(self.spans.len());
        for &(at, len) in &self.spans {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(at - cursor);
            let (slice, tail) = tail.split_at_mut(len);
            out.push(slice);
            rest = tail;
            cursor = at + len;
        }
        out
    }

    /// Syncs the data and puts the file in place ([`crate::atomic::Staged::commit`]).
    pub fn finish(self) -> Result<()> {
        self.map.flush().map_err(|e| Error::output(&self.path, e))?;
        drop(self.map);
        self.staged.commit(Some(self.file))
    }
}

/// Sizes `file` to `len` bytes with every block allocated, so that a later write through a
/// memory map cannot fail for lack of space (a full disk is reported here, as ENOSPC, instead
/// of killing the writer with SIGBUS).
fn reserve(file: &File, len: u64) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        if len > 0 {
            let len = libc::off_t::try_from(len)
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::FileTooLarge))?;
            // SAFETY: the descriptor is open for writing for the duration of the call.
            let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len) };
            if rc != 0 {
                return Err(std::io::Error::from_raw_os_error(rc));
            }
        }
    }
    file.set_len(len)
}

/// Writes `tensors` as 1-D U8 tensors with `metadata`, atomically (see [`U8FileWriter`]).
pub fn write_u8_tensors(
    path: &Path,
    tensors: &[(&str, &[u8])],
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let sizes: Vec<(&str, usize)> = tensors.iter().map(|(n, d)| (*n, d.len())).collect();
    let mut writer = U8FileWriter::create(path, &sizes, metadata)?;
    for (out, (_, data)) in writer.slices().into_iter().zip(tensors) {
        out[..data.len()].copy_from_slice(data);
    }
    writer.finish()
}

/// A JSON object's entries in file order, so that repeated keys can be detected (a plain map
/// would silently keep the last one).
pub(crate) struct Entries<V>(pub(crate) Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Entries<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visit<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for Visit<V> {
            type Value = Entries<V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Entries<V>, A::Error> {
                let mut v = Vec::new();
                while let Some(entry) = map.next_entry::<String, V>()? {
                    v.push(entry);
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(Visit(std::marker::PhantomData))
    }
}

impl<V> Entries<V> {
    /// The first key that appears twice, if any.
    pub(crate) fn repeated(&self) -> Option<&str> {
        let mut seen = std::collections::HashSet::with_capacity(self.0.len());
        self.0
            .iter()
            .map(|(k, _)| k.as_str())
            .find(|k| !seen.insert(*k))
    }
}

/// One tensor entry. The derived deserializer rejects a field given twice (as the official
/// safetensors reader does) instead of keeping the last one.
#[derive(Deserialize)]
struct RawTensor {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: (u64, u64),
}

/// Largest dimension we accept: reports and numpy hold shapes as signed 64-bit integers.
pub const MAX_DIM: u64 = i64::MAX as u64;

/// Validates the header of a complete safetensors file held in `file` and returns its tensors
/// (in the order of their data) and its metadata.
pub fn parse_header(
    path: &Path,
    file: &[u8],
) -> Result<(Vec<TensorInfo>, BTreeMap<String, String>)> {
    if file.len() < 8 {
        return Err(Error::header(
            path,
            format!(
                "file is {} bytes, too short for the 8-byte header length",
                file.len()
            ),
        ));
    }
    let n = u64::from_le_bytes(file[..8].try_into().expect("8 bytes"));
    if n > MAX_HEADER_LEN {
        return Err(Error::header(
            path,
            format!("header length {n} exceeds the limit of {MAX_HEADER_LEN} bytes"),
        ));
    }
    let avail = file.len() as u64 - 8;
    if n > avail {
        return Err(Error::header(
            path,
            format!(
                "header length {n} runs past the end of the file ({} bytes)",
                file.len()
            ),
        ));
    }
    let header = &file[8..8 + n as usize];
    if header.first() != Some(&b'{') {
        return Err(Error::header(path, "header does not start with '{'"));
    }
    let entries: Entries<Box<serde_json::value::RawValue>> = serde_json::from_slice(header)
        .map_err(|e| Error::header(path, format!("header is not valid JSON: {e}")))?;
    if let Some(name) = entries.repeated() {
        return Err(Error::tensor(
            path,
            name,
            "appears more than once in the header",
        ));
    }
    let buffer_len = avail - n;
    let data_start = 8 + n;

    let mut metadata = BTreeMap::new();
    let mut tensors: Vec<TensorInfo> = Vec::with_capacity(entries.0.len());
    for (name, value) in entries.0 {
        if name == "__metadata__" {
            if value.get() == "null" {
                continue; // as the official reader: no metadata
            }
            let meta: Entries<String> = serde_json::from_str(value.get()).map_err(|e| {
                Error::header(
                    path,
                    format!("__metadata__ must map strings to strings: {e}"),
                )
            })?;
            if let Some(key) = meta.repeated() {
                return Err(Error::header(
                    path,
                    format!(
                        "__metadata__ key '{}' appears more than once",
                        crate::text::printable(key)
                    ),
                ));
            }
            metadata = meta.0.into_iter().collect();
            continue;
        }
        let raw: RawTensor = serde_json::from_str(value.get())
            .map_err(|e| Error::tensor(path, &name, format!("malformed entry: {e}")))?;
        let dtype = Dtype::parse(&raw.dtype)
            .ok_or_else(|| Error::tensor(path, &name, format!("unknown dtype '{}'", raw.dtype)))?;
        let (begin, end) = raw.data_offsets;
        if end < begin {
            return Err(Error::tensor(
                path,
                &name,
                format!("data_offsets [{begin}, {end}] end before they begin"),
            ));
        }
        if end > buffer_len {
            return Err(Error::tensor(
                path,
                &name,
                format!(
                    "data_offsets [{begin}, {end}] run past the end of the data buffer ({buffer_len} bytes)"
                ),
            ));
        }
        if let Some(d) = raw.shape.iter().find(|&&d| d > MAX_DIM) {
            return Err(Error::tensor(
                path,
                &name,
                format!("shape {:?}: dimension {d} exceeds 2^63 - 1", raw.shape),
            ));
        }
        let numel = raw
            .shape
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| {
                Error::tensor(path, &name, format!("shape {:?} overflows", raw.shape))
            })?;
        let bits = numel.checked_mul(dtype.bits()).ok_or_else(|| {
            Error::tensor(path, &name, format!("shape {:?} overflows", raw.shape))
        })?;
        if bits % 8 != 0 {
            return Err(Error::tensor(
                path,
                &name,
                format!(
                    "shape {:?} of {dtype} is {numel} elements of {} bits, not whole bytes",
                    raw.shape,
                    dtype.bits()
                ),
            ));
        }
        let nbytes = bits / 8;
        if nbytes != end - begin {
            return Err(Error::tensor(
                path,
                &name,
                format!(
                    "shape {:?} of {} needs {nbytes} bytes but data_offsets [{begin}, {end}] hold {}",
                    raw.shape,
                    dtype,
                    end - begin
                ),
            ));
        }
        tensors.push(TensorInfo {
            name,
            dtype,
            shape: raw.shape,
            numel,
            // Both fit in usize: they are bounded by the length of a mapped file.
            offset: (data_start + begin) as usize,
            len: (end - begin) as usize,
        });
    }

    // The tensors must tile the data buffer: no overlap, no gap, nothing after the last one.
    tensors.sort_by_key(|t| (t.offset, t.len));
    let mut cursor = data_start as usize;
    let mut prev: Option<&TensorInfo> = None;
    for t in &tensors {
        if t.offset < cursor {
            let other = prev.map(|p| p.name.as_str()).unwrap_or("?");
            return Err(Error::tensor(
                path,
                &t.name,
                format!("data overlaps tensor '{other}'"),
            ));
        }
        if t.offset > cursor {
            return Err(Error::tensor(
                path,
                &t.name,
                format!(
                    "{} bytes of the data buffer before this tensor belong to no tensor",
                    t.offset - cursor
                ),
            ));
        }
        cursor = t.offset + t.len;
        prev = Some(t);
    }
    if cursor != file.len() {
        return Err(Error::header(
            path,
            format!(
                "{} bytes after the last tensor belong to no tensor (the data buffer must end where the file ends)",
                file.len() - cursor
            ),
        ));
    }
    Ok((tensors, metadata))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal writer for tests: tensors laid out in the given order, no padding.
    fn file(header: &str, data_len: usize) -> Vec<u8> {
        let mut v = (header.len() as u64).to_le_bytes().to_vec();
        v.extend_from_slice(header.as_bytes());
        v.extend(std::iter::repeat_n(7u8, data_len));
        v
    }

    fn err(header: &str, data_len: usize) -> String {
        parse_header(Path::new("x.safetensors"), &file(header, data_len))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn accepts_valid_and_unpadded() {
        let h = r#"{"b":{"dtype":"BF16","shape":[3],"data_offsets":[1,7]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"__metadata__":{"format":"pt"}}"#;
        let (t, m) = parse_header(Path::new("x"), &file(h, 7)).unwrap();
        assert_eq!(t[0].name, "a");
        assert_eq!(t[1].name, "b");
        assert_eq!(t[1].offset, 8 + h.len() + 1);
        assert_eq!(t[1].numel, 3);
        assert_eq!(m["format"], "pt");
    }

    #[test]
    fn accepts_zero_sized_and_scalar() {
        let h = r#"{"e":{"dtype":"F32","shape":[0,4],"data_offsets":[0,0]},"s":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}"#;
        let (t, _) = parse_header(Path::new("x"), &file(h, 4)).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t.iter().find(|t| t.name == "s").unwrap().numel, 1);
    }

    #[test]
    fn rejects_each_defect() {
        let cases = [
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
                4,
                "run past the end",
            ),
            (
                r#"{"a":{"dtype":"Q7","shape":[2],"data_offsets":[0,8]}}"#,
                8,
                "unknown dtype 'Q7'",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                8,
                "needs 12 bytes",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                8,
                "overlaps",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                8,
                "belong to no tensor",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
                8,
                "after the last tensor",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                8,
                "more than once",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]"#,
                4,
                "not valid JSON",
            ),
            (r#"{"a":{"dtype":"F32","shape":[1]}}"#, 4, "malformed entry"),
            (
                r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}"#,
                4,
                "end before",
            ),
            (r#"{"__metadata__":{"k":1}}"#, 0, "__metadata__"),
            (r#"[1]"#, 0, "does not start"),
            (
                r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,4]}}"#,
                4,
                "overflows",
            ),
            // A repeated field inside an entry: the official reader refuses it too.
            (
                r#"{"a":{"dtype":"F32","dtype":"BF16","shape":[1],"data_offsets":[0,4]}}"#,
                4,
                "duplicate field `dtype`",
            ),
            // Dimensions past what reports (and numpy) can hold, even with zero elements.
            (
                r#"{"a":{"dtype":"F32","shape":[0,18446744073709551615],"data_offsets":[0,0]}}"#,
                0,
                "exceeds 2^63 - 1",
            ),
            (
                r#"{"__metadata__":{"k":"a","k":"b"}}"#,
                0,
                "appears more than once",
            ),
        ];
        for (h, n, want) in cases {
            let e = err(h, n);
            assert!(e.contains(want), "{h}: got {e}");
            assert!(e.starts_with("x.safetensors: "), "{e}");
        }
    }

    #[test]
    fn writes_what_it_reads() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.rlmask");
        let meta = BTreeMap::from([("format".to_string(), "rlmask".to_string())]);
        write_u8_tensors(&p, &[("b", &[1, 2, 3]), ("a", &[9; 16])], &meta).unwrap();
        let shard = Shard::open(&p).unwrap();
        assert_eq!(shard.metadata, meta);
        let a = shard.tensors.iter().find(|t| t.name == "a").unwrap();
        let b = shard.tensors.iter().find(|t| t.name == "b").unwrap();
        assert_eq!(shard.bytes(a), &[9; 16]);
        assert_eq!(shard.bytes(b), &[1, 2, 3, 0, 0, 0, 0, 0]);
        assert!(a.offset % 8 == 0 && b.offset % 8 == 0);
        // No temporary file is left behind; a failed write leaves the old file in place.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let bad = write_u8_tensors(&p, &[("x", &[1]), ("x", &[2])], &meta);
        assert!(bad.is_err());
        assert!(Shard::open(&p).is_ok());
    }

    #[test]
    fn rejects_bad_lengths() {
        let p = Path::new("f");
        assert!(parse_header(p, &[1, 2, 3])
            .unwrap_err()
            .to_string()
            .contains("too short"));
        let mut v = 1000u64.to_le_bytes().to_vec();
        v.extend_from_slice(b"{}");
        assert!(parse_header(p, &v)
            .unwrap_err()
            .to_string()
            .contains("runs past the end"));
        let v = (MAX_HEADER_LEN + 1).to_le_bytes().to_vec();
        assert!(parse_header(p, &v)
            .unwrap_err()
            .to_string()
            .contains("exceeds the limit"));
    }
}

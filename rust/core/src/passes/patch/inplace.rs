//! Applying patches in place (design §9): the checkpoint directory is updated where it lies,
//! only the pieces of its files that hold a change rewritten, with an undo journal that makes
//! a crash at any moment recoverable to the old weights.
//!
//! 1. **Check** ([`check_chain`], then every tensor streamed through the patches as
//!    [`apply`](super::apply) does, nothing written): the directory must be exactly the first
//!    patch's base (every tensor's fingerprint), and every patch must give what it promises.
//!    The changed elements' positions and old bytes go to the journal as they are found.
//! 2. **Journal**: written beside the shards under a temporary name, synced, renamed to
//!    [`JOURNAL`], the directory synced: from then on the journal is complete and checked (a
//!    BLAKE3 of all of it closes it).
//! 3. **Write**: every tensor streamed again; each piece of it that a patch changes is written
//!    over the file's bytes (`pwrite`), unchanged pieces are not touched; the shards are synced.
//! 4. **Done**: the journal is removed and the directory synced.
//!
//! A crash before 2 leaves the old weights untouched; between 2 and 4 the journal holds the old
//! bytes of every element that may have been written, and [`recover`] (run by the next
//! in-place apply, or `rlmask patch recover`) writes them back and checks the old
//! fingerprints. While a journal is present the checkpoint is refused by every other command.

use super::apply::{check_chain, start_writeback, stream_tensor};
use super::*;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

pub use crate::checkpoint::JOURNAL;
const MAGIC: &[u8; 8] = b"RLMJRNL2";
/// What follows in a journal: one more record, or the end (then the hash of all before it).
const RECORD: u8 = 1;
const END: u8 = 0;

/// One tensor's undo record.
struct Record {
    name: String,
    shard: u32,
    /// Byte offset of the tensor in its file.
    offset: u64,
    size: u32,
    /// The base's fingerprint of the whole tensor (checked after a rollback).
    base: String,
    indices: Vec<u64>,
    old: Vec<u8>,
}

impl Record {
    fn write(&self, out: &mut impl Write) -> std::io::Result<()> {
        out.write_all(&(self.name.len() as u32).to_le_bytes())?;
        out.write_all(self.name.as_bytes())?;
        out.write_all(&self.shard.to_le_bytes())?;
        out.write_all(&self.offset.to_le_bytes())?;
        out.write_all(&self.size.to_le_bytes())?;
        out.write_all(&(self.base.len() as u32).to_le_bytes())?;
        out.write_all(self.base.as_bytes())?;
        out.write_all(&(self.indices.len() as u64).to_le_bytes())?;
        // The ascending indices as gaps (`index - previous - 1`, from -1) in LEB128 varints:
        // a byte each at RL's densities.
        let mut buf = Vec::with_capacity(self.indices.len() + 16);
        let mut next = 0u64;
        for &i in &self.indices {
            let mut gap = i - next;
            while gap >= 0x80 {
                buf.push((gap as u8) | 0x80);
                gap >>= 7;
            }
            buf.push(gap as u8);
            next = i + 1;
        }
        out.write_all(&(buf.len() as u64).to_le_bytes())?;
        out.write_all(&buf)?;
        out.write_all(&self.old)
    }

    fn read(r: &mut &[u8]) -> Option<Record> {
        fn take<'a>(r: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            if r.len() < n {
                return None;
            }
            let (a, b) = r.split_at(n);
            *r = b;
            Some(a)
        }
        let u32_ = |r: &mut &[u8]| take(r, 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()));
        let u64_ = |r: &mut &[u8]| take(r, 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()));
        let n = u32_(r)? as usize;
        let name = String::from_utf8(take(r, n)?.to_vec()).ok()?;
        let shard = u32_(r)?;
        let offset = u64_(r)?;
        let size = u32_(r)?;
        let n = u32_(r)? as usize;
        let base = String::from_utf8(take(r, n)?.to_vec()).ok()?;
        let count = usize::try_from(u64_(r)?).ok()?;
        let gaps_len = usize::try_from(u64_(r)?).ok()?;
        let mut gaps = take(r, gaps_len)?;
        let mut indices = Vec::with_capacity(count.min(gaps_len));
        let mut next = 0u64;
        for _ in 0..count {
            let (mut gap, mut shift) = (0u64, 0u32);
            loop {
                let (&b, rest) = gaps.split_first()?;
                gaps = rest;
                gap |= u64::from(b & 0x7f).checked_shl(shift)?;
                if b & 0x80 == 0 {
                    break;
                }
                shift += 7;
                if shift > 63 {
                    return None;
                }
            }
            let i = next.checked_add(gap)?;
            indices.push(i);
            next = i.checked_add(1)?;
        }
        if !gaps.is_empty() {
            return None;
        }
        let old = take(r, count.checked_mul(size as usize)?)?.to_vec();
        Some(Record {
            name,
            shard,
            offset,
            size,
            base,
            indices,
            old,
        })
    }
}

/// The directory whose shards a checkpoint's are, refusing a single file named directly (its
/// journal would have nowhere to live that the checkpoint owns).
fn directory(base: &Checkpoint) -> Result<PathBuf> {
    let dir = if base.path.is_dir() {
        base.path.clone()
    } else {
        base.path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    };
    if base
        .shards
        .iter()
        .any(|s| s.path.parent() != Some(dir.as_path()))
    {
        return Err(Error::InvalidArgument(format!(
            "{}: an in-place apply updates a checkpoint directory whose shards lie in it",
            base.path.display()
        )));
    }
    Ok(dir)
}

/// Where every element of `old` differs from `new` (elements of `size` bytes), as indices
/// counted from `first`, with their old bytes.
fn changed_elements(old: &[u8], new: &[u8], size: usize, first: u64, rec: &mut Record) {
    if old == new {
        return;
    }
    match size {
        1 => changed_words::<1>(old, new, first, rec),
        2 => changed_words::<2>(old, new, first, rec),
        4 => changed_words::<4>(old, new, first, rec),
        8 => changed_words::<8>(old, new, first, rec),
        _ => {
            for (k, (o, n)) in old
                .chunks_exact(size)
                .zip(new.chunks_exact(size))
                .enumerate()
            {
                if o != n {
                    rec.indices.push(first + k as u64);
                    rec.old.extend_from_slice(o);
                }
            }
        }
    }
}

/// [`changed_elements`] for elements of `S` bytes (a divisor of 8): eight bytes at a time as
/// words; the elements of a word that differs found from the lanes of the XOR.
fn changed_words<const S: usize>(old: &[u8], new: &[u8], first: u64, rec: &mut Record) {
    let per = 8 / S;
    let lane = if S == 8 {
        u64::MAX
    } else {
        (1u64 << (8 * S)) - 1
    };
    let mut push = |k: usize| {
        let o: [u8; S] = old[k * S..(k + 1) * S].try_into().expect("S bytes");
        rec.indices.push(first + k as u64);
        rec.old.extend_from_slice(&o);
    };
    let words = old.len() / 8;
    for w in 0..words {
        let o = u64::from_le_bytes(old[8 * w..8 * w + 8].try_into().expect("8 bytes"));
        let n = u64::from_le_bytes(new[8 * w..8 * w + 8].try_into().expect("8 bytes"));
        let x = o ^ n;
        if x == 0 {
            continue;
        }
        for j in 0..per {
            if (x >> (8 * S * j)) & lane != 0 {
                push(w * per + j);
            }
        }
    }
    for k in words * per..old.len() / S {
        if old[k * S..(k + 1) * S] != new[k * S..(k + 1) * S] {
            push(k);
        }
    }
}

/// Applies `patches` in order to the checkpoint directory of `base`, in place (see the module
/// documentation); `recover`s an earlier interrupted one first.
pub fn apply_in_place(base: &Checkpoint, patches: &[&Patch], progress: &Progress) -> Result<()> {
    let dir = directory(base)?;
    let journal = dir.join(JOURNAL);
    if journal.exists() {
        return Err(Error::Changed {
            path: journal,
            reason: "an in-place apply was interrupted here: run `rlmask patch recover` on the \
                     directory first (it restores the weights from before it)"
                .into(),
        });
    }
    check_chain(base, patches)?;
    let total: u64 = base
        .shards
        .iter()
        .map(|s| s.file_bytes().len() as u64)
        .sum();
    progress.total.store(2 * total, Ordering::Relaxed);
    // Shards by address (a `usize`, shareable between threads).
    let index: HashMap<usize, u32> = base
        .shards
        .iter()
        .enumerate()
        .map(|(i, s)| (std::ptr::from_ref(s) as usize, i as u32))
        .collect();
    let names: Vec<&str> = base.names().collect();

    let files: Vec<String> = base
        .shards
        .iter()
        .map(|s| {
            s.path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();

    // 1. Check everything, streaming the undo records into the journal under its temporary
    //    name (nothing of the checkpoint written yet; the temporary file is removed on any
    //    failure). A record per 4 MiB piece with changes, written as soon as it is found, so
    //    memory holds only the pieces in flight whatever the model's size.
    let (staged, file) = crate::atomic::Staged::file(&journal, "part")?;
    let out = |e| Error::output(&journal, e);
    let sink = Mutex::new((
        BufWriter::with_capacity(1 << 20, file),
        blake3::Hasher::new(),
    ));
    let emit = |bytes: &[u8]| -> Result<()> {
        let mut g = sink.lock().unwrap_or_else(|e| e.into_inner());
        g.1.update(bytes);
        g.0.write_all(bytes).map_err(out)
    };
    let head = serde_json::to_vec(&files).expect("strings serialise");
    let mut body = Vec::new();
    body.extend_from_slice(MAGIC);
    body.extend_from_slice(&(head.len() as u64).to_le_bytes());
    body.extend_from_slice(&head);
    emit(&body)?;
    names.par_iter().try_for_each(|name| -> Result<()> {
        progress.check()?;
        let (shard, t) = base.get(name).expect("listed");
        let size = t.dtype.size().max(1);
        let bytes = shard.bytes(t);
        let mut rec = Record {
            name: name.to_string(),
            shard: index[&(std::ptr::from_ref(shard) as usize)],
            offset: t.offset as u64,
            size: size as u32,
            base: patches[0].entries[*name].base.clone(),
            indices: Vec::new(),
            old: Vec::new(),
        };
        let mut encoded = Vec::new();
        let mut at = 0usize;
        stream_tensor(
            name,
            bytes,
            t.dtype,
            patches,
            &base.path,
            true,
            &mut |piece| {
                changed_elements(
                    &bytes[at..at + piece.len()],
                    piece,
                    size,
                    (at / size) as u64,
                    &mut rec,
                );
                if !rec.indices.is_empty() {
                    encoded.clear();
                    encoded.push(RECORD);
                    rec.write(&mut encoded).map_err(out)?;
                    emit(&encoded)?;
                    rec.indices.clear();
                    rec.old.clear();
                }
                at += piece.len();
                progress
                    .done
                    .fetch_add(piece.len() as u64, Ordering::Relaxed);
                Ok(())
            },
        )
    })?;
    check_all_unchanged(base.shards.iter())?;
    progress.check()?; // the last moment a cancel leaves everything as it was

    // 2. The journal closed (an end mark and the hash of all of it) and synced, and put in
    //    place, before the first byte of a shard is written.
    emit(&[END])?;
    let (mut w, hasher) = sink.into_inner().unwrap_or_else(|e| e.into_inner());
    w.write_all(hasher.finalize().as_bytes()).map_err(out)?;
    let file = w.into_inner().map_err(|e| out(e.into_error()))?;
    staged.commit(Some(file))?;
    crate::atomic::sync_dir(&dir);

    // 3. The changed pieces written over the shards.
    let handles: Vec<File> = base
        .shards
        .iter()
        .map(|s| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(&s.path)
                .map_err(|e| Error::output(&s.path, e))
        })
        .collect::<Result<_>>()?;
    let changed: BTreeSet<&str> = names
        .iter()
        .copied()
        .filter(|n| patches.iter().any(|p| p.entries[*n].changed > 0))
        .collect();
    // For crash tests only: the process aborts after this many pieces were written.
    let crash_after: Option<usize> = std::env::var("RLMASK_TEST_CRASH_AFTER_WRITES")
        .ok()
        .and_then(|v| v.parse().ok());
    let pieces_written = std::sync::atomic::AtomicUsize::new(0);
    let written = changed.par_iter().try_for_each(|name| -> Result<()> {
        let (shard, t) = base.get(name).expect("listed");
        let file = &handles[index[&(std::ptr::from_ref(shard) as usize)] as usize];
        let mut at = 0usize;
        // Pieces are read from the map before they are written: each is written once, after
        // its own bytes were read, and no later piece overlaps it.
        let bytes = shard.bytes(t);
        stream_tensor(
            name,
            bytes,
            t.dtype,
            patches,
            &base.path,
            false,
            &mut |piece| {
                // Ctrl-C while writing: the journal puts the old weights back (below), so a
                // cancelled apply leaves the checkpoint as it found it, as it says.
                progress.check()?;
                if bytes[at..at + piece.len()] != *piece {
                    file.write_all_at(piece, (t.offset + at) as u64)
                        .map_err(|e| Error::output(&shard.path, e))?;
                    let n = pieces_written.fetch_add(1, Ordering::Relaxed) + 1;
                    if crash_after.is_some_and(|c| n >= c) {
                        std::process::abort();
                    }
                }
                at += piece.len();
                progress
                    .done
                    .fetch_add(piece.len() as u64, Ordering::Relaxed);
                Ok(())
            },
        )?;
        start_writeback(file, t.offset as u64, t.len as u64);
        Ok(())
    });
    let written = written.and_then(|()| {
        handles
            .iter()
            .zip(&base.shards)
            .try_for_each(|(f, s)| f.sync_all().map_err(|e| Error::output(&s.path, e)))
    });
    if let Err(e) = written {
        // The old weights back from the journal (which stays if that fails too).
        drop(handles);
        return Err(match recover(&dir) {
            Ok(_) => e,
            Err(again) => Error::Changed {
                path: journal,
                reason: format!(
                    "the in-place apply failed ({e}) and so did its rollback ({again}); run \
                     `rlmask patch recover` on the directory"
                ),
            },
        });
    }
    // 4. Done: the journal goes.
    std::fs::remove_file(&journal).map_err(|e| Error::output(&journal, e))?;
    crate::atomic::sync_dir(&dir);
    Ok(())
}

/// Undoes an interrupted in-place apply of the directory `dir`: writes back the old bytes its
/// journal holds, syncs, checks every journaled tensor against the fingerprint it had before,
/// and removes the journal. Returns how many tensors were restored (0 when there is no
/// journal: an apply that stopped before its journal was in place wrote nothing).
pub fn recover(dir: &Path) -> Result<usize> {
    let journal = dir.join(JOURNAL);
    let data = match std::fs::read(&journal) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io(&journal, e)),
    };
    let bad = |why: &str| Error::Changed {
        path: journal.clone(),
        reason: format!("{why}: it cannot restore the weights; they may mix two versions"),
    };
    if data.len() < 32 + 16 || &data[..8] != MAGIC {
        return Err(bad("not an rlmask journal"));
    }
    let (body, sum) = data.split_at(data.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err(bad("the journal is damaged (its checksum differs)"));
    }
    let mut r = &body[8..];
    let head_len = u64::from_le_bytes(r[..8].try_into().unwrap()) as usize;
    r = &r[8..];
    let files: Vec<String> = r
        .get(..head_len)
        .and_then(|h| serde_json::from_slice(h).ok())
        .ok_or_else(|| bad("its header cannot be read"))?;
    r = &r[head_len..];
    let mut records = Vec::new();
    loop {
        let (&tag, rest) = r.split_first().ok_or_else(|| bad("cut short"))?;
        r = rest;
        match tag {
            RECORD => {
                records.push(Record::read(&mut r).ok_or_else(|| bad("a record cannot be read"))?)
            }
            END if r.is_empty() => break,
            _ => return Err(bad("a record cannot be read")),
        }
    }
    let handles: Vec<File> = files
        .iter()
        .map(|f| {
            let p = dir.join(f);
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&p)
                .map_err(|e| Error::output(&p, e))
        })
        .collect::<Result<_>>()?;
    for rec in &records {
        let file = handles
            .get(rec.shard as usize)
            .ok_or_else(|| bad("a record names no shard"))?;
        let size = rec.size as usize;
        for (i, old) in rec.indices.iter().zip(rec.old.chunks_exact(size)) {
            file.write_all_at(old, rec.offset + i * size as u64)
                .map_err(|e| Error::output(&dir.join(&files[rec.shard as usize]), e))?;
        }
    }
    for (f, name) in handles.iter().zip(&files) {
        f.sync_all()
            .map_err(|e| Error::output(&dir.join(name), e))?;
    }
    // The old weights, checked: each restored tensor's bytes have its old fingerprint (a
    // tensor has a record per piece with changes; each is checked once), each shard opened
    // once.
    let mut tensors: Vec<&Record> = records.iter().collect();
    tensors.sort_by_key(|r| (r.shard, r.offset));
    tensors.dedup_by_key(|r| (r.shard, r.offset));
    let mut opened: HashMap<u32, Shard> = HashMap::new();
    for rec in &tensors {
        let name = &files[rec.shard as usize];
        let shard = match opened.entry(rec.shard) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => v.insert(Shard::open(&dir.join(name))?),
        };
        let t = shard
            .tensors
            .iter()
            .find(|t| t.name == rec.name && t.offset as u64 == rec.offset)
            .ok_or_else(|| bad("a record names no tensor"))?;
        if !matches(shard.bytes(t), &rec.base) {
            return Err(Error::Changed {
                path: dir.join(name),
                reason: format!(
                    "tensor '{}' does not have its old fingerprint after the rollback",
                    t.name
                ),
            });
        }
    }
    std::fs::remove_file(&journal).map_err(|e| Error::output(&journal, e))?;
    crate::atomic::sync_dir(dir);
    Ok(tensors.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back_as_written() {
        for indices in [
            vec![0, 7, 1 << 20],
            vec![3, 4, u64::from(u32::MAX) + 9],
            vec![],
        ] {
            let rec = Record {
                name: "model.w".into(),
                shard: 2,
                offset: 4096,
                size: 2,
                base: "ab".repeat(32),
                old: (0..2 * indices.len() as u8).collect(),
                indices,
            };
            let mut bytes = Vec::new();
            rec.write(&mut bytes).unwrap();
            let mut r = bytes.as_slice();
            let back = Record::read(&mut r).unwrap();
            assert!(r.is_empty());
            assert_eq!(
                (back.name, back.shard, back.offset, back.size, back.base),
                (rec.name, rec.shard, rec.offset, rec.size, rec.base)
            );
            assert_eq!((back.indices, back.old), (rec.indices, rec.old));
            // Cut anywhere, it does not read.
            for cut in 0..bytes.len() {
                assert!(Record::read(&mut &bytes[..cut]).is_none());
            }
        }
    }

    #[test]
    fn changed_elements_against_a_plain_loop() {
        for size in [1usize, 2, 4, 8, 3] {
            let old: Vec<u8> = (0..size * 101).map(|i| (i * 7) as u8).collect();
            let mut new = old.clone();
            for e in [0usize, 5, 6, 50, 100] {
                new[e * size + size - 1] ^= 1;
            }
            let mut rec = Record {
                name: String::new(),
                shard: 0,
                offset: 0,
                size: size as u32,
                base: String::new(),
                indices: Vec::new(),
                old: Vec::new(),
            };
            changed_elements(&old, &new, size, 10, &mut rec);
            assert_eq!(rec.indices, vec![10, 15, 16, 60, 110], "size {size}");
            let want: Vec<u8> = [0usize, 5, 6, 50, 100]
                .iter()
                .flat_map(|&e| old[e * size..(e + 1) * size].to_vec())
                .collect();
            assert_eq!(rec.old, want);
        }
    }
}

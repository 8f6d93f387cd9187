//! The one way rlmask puts an output in place (design §5): written under a temporary name beside
//! the target, created exclusively (`O_EXCL`) under a name unique to this process and this
//! call, synced, renamed over the target, and the directory synced, so that a crash leaves
//! either the old target or the new one. Temporary names read `.NAME.TAG.PID.N.tmp`: a killed
//! run's leftovers are recognisable, and the next write beside the same target removes those
//! whose process is gone. Nothing unfinished survives a drop.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// Distinguishes the temporary names one process makes.
static NEXT: AtomicU64 = AtomicU64::new(0);

fn parent(target: &Path) -> &Path {
    target
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

fn file_name(target: &Path) -> String {
    target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Whether process `pid` still runs (on Unix: `kill(pid, 0)` does not answer ESRCH).
fn alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        // SAFETY: signal 0 sends nothing; kill only checks that the process exists.
        let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// Removes the temporary files and folders that runs killed while writing beside `target`
/// left: `.NAME.TAG.PID.N.tmp` whose process is gone. Best effort.
pub fn clean_leftovers(target: &Path) {
    let prefix = format!(".{}.", file_name(target));
    let Ok(entries) = std::fs::read_dir(parent(target)) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(middle) = name
            .strip_prefix(&prefix)
            .and_then(|r| r.strip_suffix(".tmp"))
        else {
            continue;
        };
        // TAG.PID.N: the process id is the second field from the end.
        let mut fields = middle.rsplit('.');
        let (Some(_n), Some(pid)) = (fields.next(), fields.next()) else {
            continue;
        };
        if let Ok(pid) = pid.parse::<u32>() {
            if pid != std::process::id() && !alive(pid) {
                let path = entry.path();
                let _ = std::fs::remove_file(&path).or_else(|_| std::fs::remove_dir_all(&path));
            }
        }
    }
}

/// A name for a temporary file or folder beside `target`, unique to this process and call.
pub fn temporary_name(target: &Path, tag: &str) -> PathBuf {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    parent(target).join(format!(
        ".{}.{tag}.{}.{n}.tmp",
        file_name(target),
        std::process::id()
    ))
}

/// Syncs a directory, so that a rename in it survives a crash. Best effort where the
/// filesystem refuses to sync directories.
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// A new file, created exclusively (never an existing one), readable and writable.
pub fn create_new(path: &Path) -> std::io::Result<File> {
    File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
}

/// An output in the making: a temporary file or folder beside its target, put in place by
/// [`Staged::commit`], removed if dropped first.
#[derive(Debug)]
pub struct Staged {
    target: PathBuf,
    tmp: PathBuf,
    dir: bool,
    done: bool,
}

impl Staged {
    fn new(target: &Path, tag: &str, dir: bool) -> Result<(Staged, Option<File>)> {
        clean_leftovers(target);
        loop {
            let tmp = temporary_name(target, tag);
            let made = if dir {
                std::fs::create_dir(&tmp).map(|_| None)
            } else {
                create_new(&tmp).map(Some)
            };
            match made {
                Ok(file) => {
                    let staged = Staged {
                        target: target.to_path_buf(),
                        tmp,
                        dir,
                        done: false,
                    };
                    return Ok((staged, file));
                }
                // Someone else's leftover under the same name: take the next one.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::output(target, e)),
            }
        }
    }

    /// A temporary file for `target`, and the file, open for reading and writing.
    pub fn file(target: &Path, tag: &str) -> Result<(Staged, File)> {
        let (staged, file) = Staged::new(target, tag, false)?;
        Ok((staged, file.expect("a file was created")))
    }

    /// A temporary folder for `target`.
    pub fn folder(target: &Path, tag: &str) -> Result<Staged> {
        Ok(Staged::new(target, tag, true)?.0)
    }

    /// Where the output is being written.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Puts the output in place: syncs `file` (the temporary file's handle, if still open),
    /// renames the temporary over the target and syncs the directory.
    pub fn commit(mut self, file: Option<File>) -> Result<()> {
        if let Some(f) = file {
            f.sync_all().map_err(|e| Error::output(&self.target, e))?;
        }
        std::fs::rename(&self.tmp, &self.target).map_err(|e| Error::output(&self.target, e))?;
        self.done = true;
        sync_dir(parent(&self.target));
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.done {
            let _ = if self.dir {
                std::fs::remove_dir_all(&self.tmp)
            } else {
                std::fs::remove_file(&self.tmp)
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_writers_of_one_target_never_share_a_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        let (a, _fa) = Staged::file(&target, "part").unwrap();
        let (b, _fb) = Staged::file(&target, "part").unwrap();
        assert_ne!(a.path(), b.path());
        drop(a);
        assert!(!dir.path().join(".out.bin.part.tmp").exists());
        b.commit(None).unwrap();
        assert!(target.exists());
        // Only the target is left.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn leftovers_of_dead_processes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("m.rlmask");
        // A pid that cannot be running (beyond the kernel's limit), and this process's own.
        let dead = dir.path().join(".m.rlmask.part.4194999.0.tmp");
        let ours = dir
            .path()
            .join(format!(".m.rlmask.part.{}.99.tmp", std::process::id()));
        let other = dir.path().join(".n.rlmask.part.4194999.0.tmp");
        for p in [&dead, &ours, &other] {
            std::fs::write(p, b"x").unwrap();
        }
        let (staged, _f) = Staged::file(&target, "part").unwrap();
        assert!(!dead.exists(), "a dead run's leftover is cleaned");
        assert!(
            ours.exists() && other.exists(),
            "live and unrelated files are kept"
        );
        drop(staged);
    }
}

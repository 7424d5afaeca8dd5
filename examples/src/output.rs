//! Output files that are never lost: `recv --out` and `decode --out` write into a new file
//! beside the target and rename it over the target only once everything is written and
//! synced, so a session that fails, times out or is killed leaves the target as it was.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Where the bytes go.
#[derive(Debug)]
enum Kind {
    /// A regular file (new, or replaced with `--force`): written to a temporary file in the same
    /// directory, renamed over the target when complete.
    File,
    /// A character device or a FIFO (`/dev/null`, a pipe), or a block device with `--force`:
    /// written in place, in order (there is nothing to rename over).
    Stream,
}

/// A checked output target.
#[derive(Debug)]
pub struct Output {
    path: PathBuf,
    kind: Kind,
}

impl Output {
    /// Check `path` before any work starts: its directory must exist and be writable; an
    /// existing regular file or block device is refused unless `force`; a directory always.
    /// Nothing is created or changed.
    pub fn check(path: &Path, force: bool) -> Result<Output, String> {
        let shown = path.display();
        let kind = match std::fs::metadata(path) {
            Ok(m) if m.is_dir() => return Err(format!("--out {shown}: is a directory")),
            Ok(m) if m.is_file() || m.file_type().is_block_device() => {
                if !force {
                    return Err(format!(
                        "--out {shown}: already exists; refusing to replace it (pass --force to \
                         replace it once the session has completed)"
                    ));
                }
                if m.is_file() {
                    Kind::File
                } else {
                    Kind::Stream
                }
            }
            Ok(_) => Kind::Stream,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Kind::File,
            Err(e) => return Err(format!("--out {shown}: {e}")),
        };
        let out = Output {
            path: path.to_path_buf(),
            kind,
        };
        match out.kind {
            Kind::File => {
                // Prove the directory takes a new file now, not after the migration.
                let probe = out.temp_path("probe");
                create_new(&probe).map_err(|e| {
                    format!(
                        "--out {shown}: cannot create a file in {}: {e}",
                        out.dir().display()
                    )
                })?;
                let _ = std::fs::remove_file(&probe);
            }
            Kind::Stream => {
                OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(|e| format!("--out {shown}: {e}"))?;
            }
        }
        Ok(out)
    }

    /// Write the output with `fill`: a regular file is filled in a temporary file beside the
    /// target, synced, then renamed over the target (and the directory synced); on any error
    /// the temporary file is removed and the target is as it was.
    pub fn write(&self, fill: impl FnOnce(File) -> io::Result<()>) -> Result<(), String> {
        let shown = self.path.display();
        match self.kind {
            Kind::Stream => {
                let f = OpenOptions::new()
                    .write(true)
                    .open(&self.path)
                    .map_err(|e| format!("{shown}: {e}"))?;
                fill(f).map_err(|e| format!("writing {shown}: {e}"))
            }
            Kind::File => {
                let tmp = self.temp_path("partial");
                let guard = RemoveOnDrop(Some(tmp.clone()));
                let f = create_new(&tmp)
                    .map_err(|e| format!("writing {shown}: creating {}: {e}", tmp.display()))?;
                fill(f).map_err(|e| format!("writing {shown}: {e}"))?;
                std::fs::rename(&tmp, &self.path)
                    .map_err(|e| format!("writing {shown}: renaming {}: {e}", tmp.display()))?;
                guard.disarm();
                // The rename is durable once the directory is synced.
                File::open(self.dir())
                    .and_then(|d| d.sync_all())
                    .map_err(|e| format!("{shown}: syncing its directory: {e}"))
            }
        }
    }

    fn dir(&self) -> PathBuf {
        match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }

    /// `.NAME.pagewire-PID.WHAT` beside the target.
    fn temp_path(&self, what: &str) -> PathBuf {
        let name = self
            .path
            .file_name()
            .map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
        self.dir()
            .join(format!(".{name}.pagewire-{}.{what}", std::process::id()))
    }
}

fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
}

/// Removes a temporary file unless disarmed.
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests: a panic is the failure report
mod tests {
    use super::*;

    #[test]
    fn an_existing_file_is_refused_without_force_and_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, b"precious").unwrap();
        let e = Output::check(&p, false).unwrap_err();
        assert!(e.contains("already exists") && e.contains("--force"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"precious");
        // With --force the check still leaves it alone.
        let o = Output::check(&p, true).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"precious");
        // A failed fill leaves it alone too, and no temporary file behind.
        let e = o
            .write(|_| Err(io::Error::other("disk on fire")))
            .unwrap_err();
        assert!(e.contains("disk on fire"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"precious");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // A complete fill replaces it.
        o.write(|mut f| io::Write::write_all(&mut f, b"new"))
            .unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_directory_or_a_missing_parent_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = Output::check(dir.path(), true).unwrap_err();
        assert!(e.contains("is a directory"), "{e}");
        let e = Output::check(&dir.path().join("no/such/img"), false).unwrap_err();
        assert!(e.contains("cannot create a file"), "{e}");
    }

    #[test]
    fn a_character_device_is_written_in_place() {
        let o = Output::check(Path::new("/dev/null"), false).unwrap();
        o.write(|mut f| io::Write::write_all(&mut f, b"x")).unwrap();
        let full = Output::check(Path::new("/dev/full"), false).unwrap();
        let e = full
            .write(|mut f| io::Write::write_all(&mut f, &[0; 4096]))
            .unwrap_err();
        assert!(e.contains("No space left"), "{e}");
    }
}

//! Crash-safe file writes, shared by optimizer state and the trainer's checkpoints.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{OptimError, Result};

/// Writes `bytes` to `path` atomically: a temporary file in the same
/// directory (named after the file and the process id, so concurrent writers
/// never share one), `fsync`, `rename` over `path`, then an `fsync` of the
/// directory (best effort). On error the temporary file is removed and `path`
/// keeps its previous content: a crash at any moment leaves either the old or
/// the new file, never a torn one.
///
/// ```
/// # fn main() -> minibatch_optim::Result<()> {
/// let dir = std::env::temp_dir().join(format!("mb-atomic-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir).unwrap();
/// let path = dir.join("state.bin");
/// minibatch_optim::write_atomic(&path, b"first")?;
/// minibatch_optim::write_atomic(&path, b"second")?;
/// assert_eq!(std::fs::read(&path).unwrap(), b"second");
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok(()) }
/// ```
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| OptimError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path.file_name().ok_or_else(|| {
        io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "no file name",
        ))
    })?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)?;
        sync_dir(&dir);
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// Best-effort `fsync` of a directory, which makes renames inside it durable
/// on Unix. Errors are ignored (some platforms cannot open directories).
pub fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_content_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.bin");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn a_failed_write_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.bin");
        write_atomic(&p, b"old").unwrap();
        // a path whose parent does not exist cannot be written
        let bad = dir.path().join("missing").join("f.bin");
        let err = write_atomic(&bad, b"new").unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
    }
}

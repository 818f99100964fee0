//! Received instances on disk, under `<data_dir>/dicom/instances/`: each
//! written to a temporary file, fsynced, then renamed into place (and the
//! folder fsynced), so that a file under its final name is always complete;
//! leftover temporary files (a crash mid-write) are removed at start. Also
//! the free-space check the listener's disk reserve uses.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::StudyError;

/// Prefix of temporary files (never a UID: UIDs start with a digit).
const TEMP_PREFIX: &str = ".incoming-";

/// The instance folder.
#[derive(Debug)]
pub struct InstanceStorage {
    root: PathBuf,
}

impl InstanceStorage {
    /// Opens (creates, owner-only) `<data_dir>/dicom/instances` and removes
    /// temporary files a previous run left.
    ///
    /// # Errors
    /// [`StudyError::Io`] when the folder cannot be created or read.
    pub fn open(data_dir: &Path) -> Result<Self, StudyError> {
        let root = data_dir.join("dicom").join("instances");
        create_private_dir(&root)?;
        let entries = std::fs::read_dir(&root).map_err(StudyError::io("reading", &root))?;
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(Self { root })
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Writes `bytes` as `<sop_instance_uid>.dcm` (a UID checked by the
    /// caller: digits and dots only), atomically; returns its path.
    ///
    /// # Errors
    /// [`StudyError::Io`]; no file is left under the final name.
    pub fn write(&self, sop_instance_uid: &str, bytes: &[u8]) -> Result<PathBuf, StudyError> {
        let path = self.root.join(format!("{sop_instance_uid}.dcm"));
        let temp = self.root.join(format!(
            "{TEMP_PREFIX}{sop_instance_uid}-{}",
            crate::store::new_request_id()
        ));
        let written = (|| {
            let mut file = std::fs::File::create(&temp)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            std::fs::rename(&temp, &path)?;
            std::fs::File::open(&self.root)?.sync_all()
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temp);
            return Err(StudyError::Io {
                what: format!("writing {}", path.display()),
                source: e,
            });
        }
        Ok(path)
    }

    /// Free bytes for an unprivileged writer on the folder's file system.
    ///
    /// # Errors
    /// [`StudyError::Io`] when statvfs fails.
    pub fn free_bytes(&self) -> Result<u64, StudyError> {
        free_bytes(&self.root)
    }
}

/// Free bytes for an unprivileged writer on `path`'s file system.
///
/// # Errors
/// [`StudyError::Io`] when statvfs fails.
pub fn free_bytes(path: &Path) -> Result<u64, StudyError> {
    use std::os::unix::ffi::OsStrExt;
    let c_path =
        std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| StudyError::Io {
            what: format!("statvfs {}", path.display()),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in path"),
        })?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c_path` is a valid NUL-terminated string and `stat` points
    // to writable memory of the right type for the call to fill.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), stat.as_mut_ptr()) };
    if rc != 0 {
        return Err(StudyError::Io {
            what: format!("statvfs {}", path.display()),
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: statvfs returned 0, so it filled the structure.
    let stat = unsafe { stat.assume_init() };
    #[allow(clippy::unnecessary_cast)]
    let free = (stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64);
    Ok(free)
}

/// Creates `dir` and its parents, owner-only.
fn create_private_dir(dir: &Path) -> Result<(), StudyError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(StudyError::io("creating", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_whole_and_leftover_temporaries_are_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let storage = InstanceStorage::open(dir.path()).expect("open");
        let leftover = storage.root().join(format!("{TEMP_PREFIX}1.2.3-x"));
        std::fs::write(&leftover, b"partial").expect("leftover");
        let path = storage.write("1.2.3", b"whole").expect("write");
        assert_eq!(std::fs::read(&path).expect("read"), b"whole");
        let again = InstanceStorage::open(dir.path()).expect("reopen");
        assert!(!leftover.exists(), "a temporary file survived a restart");
        let names: Vec<_> = std::fs::read_dir(again.root())
            .expect("list")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["1.2.3.dcm".to_owned()]);
        assert!(storage.free_bytes().expect("statvfs") > 0);
    }
}

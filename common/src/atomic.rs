//! Writes that a reader never sees half done: a temporary sibling, then one rename.
//!
//! A crash or an error leaves either the old content or nothing, never a truncated
//! adapter that looks valid (alpaca-lora's empty `adapter_model.bin` problem).

use crate::error::{FormatError, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` through a temporary file in the same folder.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_sibling(path);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(FormatError::io(path, e));
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        FormatError::io(path, e)
    })
}

/// A folder being filled that becomes `target` only on [`StagedDir::commit`].
///
/// Dropped without commit, it removes what it wrote.
pub struct StagedDir {
    target: PathBuf,
    staging: PathBuf,
    committed: bool,
}

impl StagedDir {
    /// Starts staging a folder for `target`, which may or may not exist yet.
    pub fn new(target: &Path) -> Result<Self> {
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| FormatError::io(&parent, e))?;
        let staging = temp_sibling(target);
        std::fs::create_dir_all(&staging).map_err(|e| FormatError::io(&staging, e))?;
        Ok(Self { target: target.to_path_buf(), staging, committed: false })
    }

    /// Where to write the folder's files until commit.
    pub fn path(&self) -> &Path {
        &self.staging
    }

    /// Moves the staged files into the target folder. Files of the target that the staged
    /// folder does not have are left alone; each file moves with one rename.
    pub fn commit(mut self) -> Result<()> {
        let target = self.target.clone();
        if !target.exists() {
            std::fs::rename(&self.staging, &target).map_err(|e| FormatError::io(&target, e))?;
        } else {
            if !target.is_dir() {
                return Err(FormatError::invalid(&target, "exists and is not a folder"));
            }
            let entries = std::fs::read_dir(&self.staging).map_err(|e| FormatError::io(&self.staging, e))?;
            for entry in entries {
                let entry = entry.map_err(|e| FormatError::io(&self.staging, e))?;
                let dest = target.join(entry.file_name());
                std::fs::rename(entry.path(), &dest).map_err(|e| FormatError::io(&dest, e))?;
            }
            let _ = std::fs::remove_dir(&self.staging);
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.staging);
        }
    }
}

fn temp_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

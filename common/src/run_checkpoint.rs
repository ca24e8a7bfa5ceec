//! A training run's `checkpoint-STEP/` folders: written so that a crash at any instant
//! leaves either the new complete folder or the previous ones, verified file by file on load
//! (a manifest with every file's SHA-256 and size), and found again for a resume.
//!
//! Why a manifest: a checkpoint that loads but holds a truncated or flipped file would resume
//! a run from a wrong state silently; HF Trainer and torchrun check nothing on load. Why
//! fsync at every level: a rename is atomic but not durable; without syncing the files before
//! the rename and the parent folder after it, a power cut can leave a renamed folder whose
//! files are empty.
//!
//! Writing: every file goes into a hidden staging folder (`.checkpoint-STEP.tmp-PID`) and is
//! synced; the manifest is written last; the staging folder is synced, renamed to
//! `checkpoint-STEP`, and `output_dir` is synced. Pruning (`save_total_limit`) happens only
//! after that, and renames each old folder out of sight before deleting it, so a visible
//! `checkpoint-*` folder is always complete.

use crate::error::{FormatError, Result};
use crate::protocol::sha256_hex;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The manifest's file name (written last, so its presence means the rest was written).
pub const MANIFEST_FILE: &str = "manifest.json";
/// What the manifest says it is.
const FORMAT: &str = "lorafleet-checkpoint/1";
/// Folder names: `checkpoint-STEP` (transformers' `PREFIX_CHECKPOINT_DIR`).
const PREFIX: &str = "checkpoint-";

/// One file as the manifest records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// Size in bytes.
    pub bytes: u64,
    /// SHA-256, lower-case hex.
    pub sha256: String,
}

/// `manifest.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// The optimizer step the folder holds the state after.
    pub step: u64,
    /// Every other file of the folder.
    pub files: BTreeMap<String, FileEntry>,
}

/// `checkpoint-STEP`.
pub fn dir_name(step: u64) -> String {
    format!("{PREFIX}{step}")
}

/// The step of a folder named `checkpoint-STEP`.
pub fn step_of(dir: &Path) -> Option<u64> {
    dir.file_name()?.to_str()?.strip_prefix(PREFIX)?.parse().ok()
}

/// Writes `output_dir/checkpoint-STEP` holding `files` (name, bytes) and their manifest,
/// replacing a folder of that name, then keeps only the newest `keep` checkpoints (0: all).
/// On error nothing visible has changed except, possibly, pruning of older folders.
pub fn write(output_dir: &Path, step: u64, files: &[(&str, &[u8])], keep: usize) -> Result<PathBuf> {
    let target = output_dir.join(dir_name(step));
    remove_leftovers(output_dir);
    let staging = Staging(output_dir.join(format!(".{}.tmp-{}", dir_name(step), std::process::id())));
    let _ = std::fs::remove_dir_all(&staging.0);
    std::fs::create_dir_all(&staging.0).map_err(|e| FormatError::io(&staging.0, e))?;
    let mut manifest = Manifest { format: FORMAT.into(), step, files: BTreeMap::new() };
    for (name, bytes) in files {
        if *name == MANIFEST_FILE || name.contains('/') || name.starts_with('.') {
            return Err(FormatError::invalid(&target.join(name), "not a file name a checkpoint may hold"));
        }
        durable_write(&staging.0.join(name), bytes).map_err(|e| FormatError::io(&target.join(name), e))?;
        manifest.files.insert((*name).to_owned(), FileEntry { bytes: bytes.len() as u64, sha256: sha256_hex(bytes) });
    }
    let text = serde_json::to_string_pretty(&manifest).expect("a manifest serializes");
    durable_write(&staging.0.join(MANIFEST_FILE), text.as_bytes())
        .map_err(|e| FormatError::io(&target.join(MANIFEST_FILE), e))?;
    sync_dir(&staging.0).map_err(|e| FormatError::io(&staging.0, e))?;
    if target.exists() {
        hide_and_remove(&target)?;
    }
    std::fs::rename(&staging.0, &target).map_err(|e| FormatError::io(&target, e))?;
    std::mem::forget(staging);
    sync_dir(output_dir).map_err(|e| FormatError::io(output_dir, e))?;
    if keep > 0 {
        let all = list(output_dir)?;
        for (_, old) in all.iter().take(all.len().saturating_sub(keep)) {
            hide_and_remove(old)?;
        }
    }
    Ok(target)
}

/// The `checkpoint-STEP` folders in `output_dir`, oldest first (none if it does not exist).
pub fn list(output_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(output_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(FormatError::io(output_dir, e)),
    };
    let mut out: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| Some((step_of(&e.path())?, e.path())))
        .collect();
    out.sort();
    Ok(out)
}

/// Checks `dir` against its manifest: every listed file present with its size and SHA-256,
/// no manifest step other than the folder's. Returns the manifest.
pub fn verify(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| FormatError::io(&path, e))?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| FormatError::json(&path, &e))?;
    if manifest.format != FORMAT {
        return Err(FormatError::field(&path, "format", format!("{:?}, expected {FORMAT:?}", manifest.format)));
    }
    if let Some(step) = step_of(dir).filter(|&s| s != manifest.step) {
        return Err(FormatError::field(&path, "step", format!("{} in a folder named for step {step}", manifest.step)));
    }
    for (name, entry) in &manifest.files {
        let file = dir.join(name);
        let bytes = std::fs::read(&file).map_err(|e| FormatError::io(&file, e))?;
        if bytes.len() as u64 != entry.bytes {
            let msg = format!("{} bytes where the manifest says {} (truncated?)", bytes.len(), entry.bytes);
            return Err(FormatError::invalid(&file, msg));
        }
        if sha256_hex(&bytes) != entry.sha256 {
            return Err(FormatError::invalid(&file, "SHA-256 differs from the manifest's (the file is corrupt)"));
        }
    }
    Ok(manifest)
}

/// A checkpoint chosen for a resume, and the newer ones passed over on the way.
#[derive(Debug)]
pub struct Resolved {
    /// The verified folder.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// Folders that failed verification, newest first, with why.
    pub skipped: Vec<(PathBuf, FormatError)>,
}

/// The checkpoint to resume from: `latest` is the newest verified folder of `output_dir`; a
/// folder is that one if it verifies, else the newest verified one older than it beside it
/// (a torn or corrupt checkpoint falls back to the previous one). `Ok(None)`: none verifies.
pub fn resolve(spec: &str, output_dir: &Path) -> Result<Option<Resolved>> {
    let (parent, newest) = if spec == "latest" {
        (output_dir.to_path_buf(), u64::MAX)
    } else {
        let dir = PathBuf::from(spec);
        let step = step_of(&dir).ok_or_else(|| {
            FormatError::invalid(&dir, "a checkpoint folder is named checkpoint-STEP (or pass `latest`)")
        })?;
        if !dir.is_dir() {
            return Err(FormatError::invalid(&dir, "no such checkpoint folder"));
        }
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
        (parent.map_or_else(|| PathBuf::from("."), Path::to_path_buf), step)
    };
    let mut skipped = Vec::new();
    for (_, dir) in list(&parent)?.into_iter().rev().filter(|(s, _)| *s <= newest) {
        match verify(&dir) {
            Ok(manifest) => return Ok(Some(Resolved { dir, manifest, skipped })),
            Err(e) => skipped.push((dir, e)),
        }
    }
    Ok(None)
}

/// Removes the staging folder unless it was renamed into place.
struct Staging(PathBuf);

impl Drop for Staging {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn durable_write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Makes a folder's entries (a rename) durable. File systems that cannot sync a folder
/// (some network ones answer EINVAL) are left as they are: their renames are as durable as
/// they make them.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    match File::open(dir)?.sync_all() {
        Err(e) if matches!(e.kind(), std::io::ErrorKind::InvalidInput | std::io::ErrorKind::Unsupported) => Ok(()),
        other => other,
    }
}

/// Renames `dir` out of sight (one atomic step), then deletes it: a crash in between leaves a
/// hidden leftover, never a half-deleted `checkpoint-*` that looks like one.
fn hide_and_remove(dir: &Path) -> Result<()> {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let hidden = dir.with_file_name(format!(".{name}.old-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&hidden);
    std::fs::rename(dir, &hidden).map_err(|e| FormatError::io(dir, e))?;
    std::fs::remove_dir_all(&hidden).map_err(|e| FormatError::io(&hidden, e))
}

/// Staging and hidden folders a killed writer left behind.
fn remove_leftovers(output_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(output_dir) else { return };
    for e in entries.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!(".{PREFIX}")) && (name.contains(".tmp-") || name.contains(".old-")) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

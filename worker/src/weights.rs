//! Reading named tensors from one or several safetensors files.

use crate::error::{Error, Result};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Memory-mapped safetensors files with a name → file routing table. Tensors are read one
/// at a time, so a caller can convert or quantize each before the next is touched.
pub struct WeightFiles {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    route: HashMap<String, usize>,
}

impl WeightFiles {
    /// Opens and validates the headers of every file.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut route = HashMap::new();
        for path in paths {
            // SAFETY: the file is only read; a concurrent writer could change the mapping,
            // as with every memory-mapped checkpoint loader (transformers' included).
            let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| Error::weights(path, describe(&e)))?;
            for (name, _) in st.tensors() {
                route.insert(name, files.len());
            }
            files.push((path.clone(), st));
        }
        Ok(Self { files, route })
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.route.contains_key(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.route.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// The stored shape of `name`, read from the header without loading the data.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let &i = self.route.get(name)?;
        self.files[i].1.get(name).ok().map(|view| view.shape().to_vec())
    }

    /// The file holding `name`, for messages.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.route.get(name).map(|&i| self.files[i].0.as_path())
    }

    /// Loads `name` as `dtype` on `device`, checking its shape when `shape` is given.
    pub fn load(&self, name: &str, shape: Option<&[usize]>, dtype: DType, device: &Device) -> Result<Tensor> {
        let Some(&i) = self.route.get(name) else {
            let where_ = self.files.first().map(|f| f.0.parent().unwrap_or(&f.0).to_path_buf()).unwrap_or_default();
            return Err(Error::weights(where_, format!("tensor {name} is missing")));
        };
        let (path, st) = &self.files[i];
        let t = st.load(name, device).map_err(|e| Error::weights(path, format!("tensor {name}: {}", describe(&e))))?;
        if let Some(expected) = shape {
            if t.dims() != expected {
                return Err(Error::weights(
                    path,
                    format!("tensor {name} has shape {:?}, expected {expected:?}", t.dims()),
                ));
            }
        }
        Ok(t.to_dtype(dtype)?)
    }
}

/// candle wraps safetensors errors with its own context; keep the innermost message.
fn describe(e: &candle_core::Error) -> String {
    let text = e.to_string();
    match text.lines().next() {
        Some(first) if !first.is_empty() => first.to_owned(),
        _ => text,
    }
}

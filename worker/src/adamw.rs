//! AdamW with decoupled weight decay, step for step the same as `torch.optim.AdamW`,
//! with state that can be saved and restored (candle's optimizer keeps it private).

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

/// Hyperparameters.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// `torch.optim.AdamW`'s defaults except weight decay, which transformers' Trainer
    /// (and so alpaca-lora) sets to 0.
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// Optimizer state for a list of parameters.
pub struct AdamW {
    config: AdamWConfig,
    /// Steps taken so far.
    step: u64,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

impl AdamW {
    /// Zeroed state for parameters of these shapes (f32, on `device`).
    pub fn new(config: AdamWConfig, params: &[&Var], device: &Device) -> Result<Self> {
        let zeros = |p: &&Var| Tensor::zeros(p.shape(), DType::F32, device);
        Ok(Self {
            config,
            step: 0,
            m: params.iter().map(zeros).collect::<candle_core::Result<_>>()?,
            v: params.iter().map(zeros).collect::<candle_core::Result<_>>()?,
        })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Applies one update with learning rate `lr` to `params` using `grads` (same order).
    pub fn step(&mut self, params: &[&Var], grads: &[Tensor], lr: f64) -> Result<()> {
        if params.len() != self.m.len() || grads.len() != params.len() {
            return Err(Error::Invalid(format!(
                "AdamW holds state for {} parameters, got {} and {} grads",
                self.m.len(),
                params.len(),
                grads.len()
            )));
        }
        self.step += 1;
        let c = &self.config;
        let t = self.step as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        let step_size = lr / bias1;
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            let m = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let mut theta = p.as_tensor().clone();
            if c.weight_decay != 0.0 {
                theta = (theta * (1.0 - lr * c.weight_decay))?;
            }
            let denom = ((v.sqrt()? / bias2_sqrt)? + c.eps)?;
            let theta = (theta - (m.div(&denom)? * step_size)?)?;
            p.set(&theta)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// The state as named tensors (`exp_avg.KEY`, `exp_avg_sq.KEY`) plus the step count,
    /// keyed by the parameters' names in `names` (same order as the parameters).
    pub fn state_tensors(&self, names: &[String]) -> (HashMap<String, Tensor>, u64) {
        let mut out = HashMap::new();
        for (i, n) in names.iter().enumerate() {
            out.insert(format!("exp_avg.{n}"), self.m[i].clone());
            out.insert(format!("exp_avg_sq.{n}"), self.v[i].clone());
        }
        (out, self.step)
    }

    /// Writes the state to a safetensors file (atomically), with the step in its metadata.
    pub fn save(&self, names: &[String], path: &Path) -> Result<()> {
        lorafleet_common::atomic::write_file(path, &self.to_bytes(names)?)?;
        Ok(())
    }

    /// The state as the bytes of the safetensors file [`AdamW::save`] writes.
    pub fn to_bytes(&self, names: &[String]) -> Result<Vec<u8>> {
        let (tensors, step) = self.state_tensors(names);
        let meta = HashMap::from([("step".to_owned(), step.to_string()), ("format".to_owned(), "pt".to_owned())]);
        let mut sorted: Vec<(&String, &Tensor)> = tensors.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(b.0));
        safetensors::serialize(sorted, Some(meta)).map_err(|e| Error::Invalid(format!("optimizer state: {e}")))
    }

    /// Restores state written by [`AdamW::save`] for parameters named `names`.
    pub fn load(config: AdamWConfig, names: &[String], path: &Path, device: &Device) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::weights(path, e.to_string()))?;
        Self::from_bytes(config, names, &bytes, device).map_err(|e| Error::weights(path, e))
    }

    /// Restores state from the bytes [`AdamW::to_bytes`] made; the error says what is wrong.
    pub fn from_bytes(config: AdamWConfig, names: &[String], bytes: &[u8], device: &Device) -> Result<Self, String> {
        let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
        let step = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("step"))
            .and_then(|s| s.parse().ok())
            .ok_or("no `step` in the metadata")?;
        let tensors = candle_core::safetensors::load_buffer(bytes, device).map_err(|e| e.to_string())?;
        let take = |key: String| tensors.get(&key).cloned().ok_or_else(|| format!("tensor {key} is missing"));
        let m = names.iter().map(|n| take(format!("exp_avg.{n}"))).collect::<Result<_, _>>()?;
        let v = names.iter().map(|n| take(format!("exp_avg_sq.{n}"))).collect::<Result<_, _>>()?;
        Ok(Self { config, step, m, v })
    }

    /// The hyperparameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }
}

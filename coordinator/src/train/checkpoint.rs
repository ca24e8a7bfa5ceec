//! `output_dir/checkpoint-STEP/`: the PEFT adapter, the optimizer state and where the run
//! stood, keeping at most `save_total_limit` of them.

use anyhow::{Context, Result};
use lorafleet_common::config::TrainConfig;
use lorafleet_common::ModelConfig;
use lorafleet_worker::LoraAdapter;

/// Writes `checkpoint-STEP` from the state a replica sent (adapter and optimizer bytes).
pub fn save(
    config: &TrainConfig,
    model: &ModelConfig,
    adapter: &LoraAdapter,
    optimizer: &[u8],
    step: u64,
    epoch: u64,
) -> Result<()> {
    let dir = config.output_dir.join(format!("checkpoint-{step}"));
    lorafleet_worker::adapter_io::save_adapter(adapter, model, &dir)?;
    lorafleet_common::atomic::write_file(&dir.join("optimizer.safetensors"), optimizer)?;
    let state = serde_json::json!({ "global_step": step, "epoch": epoch, "config": config });
    lorafleet_common::atomic::write_file(
        &dir.join("trainer_state.json"),
        serde_json::to_string_pretty(&state)?.as_bytes(),
    )?;
    prune(config)
}

/// Removes the oldest checkpoints beyond `save_total_limit` (0 keeps all).
fn prune(config: &TrainConfig) -> Result<()> {
    if config.save_total_limit == 0 {
        return Ok(());
    }
    let mut steps: Vec<(usize, std::path::PathBuf)> = std::fs::read_dir(&config.output_dir)
        .with_context(|| format!("{}", config.output_dir.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            Some((name.strip_prefix("checkpoint-")?.parse().ok()?, e.path()))
        })
        .collect();
    steps.sort();
    let excess = steps.len().saturating_sub(config.save_total_limit);
    for (_, path) in steps.into_iter().take(excess) {
        std::fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
    }
    Ok(())
}

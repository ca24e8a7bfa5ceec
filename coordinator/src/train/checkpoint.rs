//! `output_dir/checkpoint-STEP/`: everything a resume needs (the PEFT adapter, the AdamW
//! state, where the run stood, what it was trained on), written durably and verified through
//! `run_checkpoint`; and `--resume_from_checkpoint`: the newest checkpoint that verifies and
//! belongs to this run.
//!
//! Why so little state: the data order is a function of (seed, epoch), every dropout mask of
//! (seed, step, example, layer, module) and the learning rate of the step, so the adapter, the
//! optimizer moments and the step count are the whole trajectory. A resumed run therefore
//! replays the same arithmetic and ends with the same bytes as one never interrupted.

use crate::schedule::SavedState;
use anyhow::{bail, Context, Result};
use lorafleet_common::config::TrainConfig;
use lorafleet_common::data::schedule::EpochSteps;
use lorafleet_common::data::Example;
use lorafleet_common::protocol::{hex, Hash};
use lorafleet_common::run_checkpoint;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::PathBuf;

/// `trainer_state.json` (transformers' name for the file).
pub const STATE_FILE: &str = "trainer_state.json";
/// The AdamW state.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// What fixes a run's trajectory besides its settings: a checkpoint made with another base
/// model, tokenizer or training data (after templating, truncation and the validation split)
/// belongs to another run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunIdentity {
    /// SHA-256 of config.json and the weight files' headers and sizes.
    pub base_model_digest: String,
    /// SHA-256 of the tokenizer files.
    pub tokenizer_digest: String,
    /// SHA-256 of every training example's token ids and labels, in order.
    pub data_digest: String,
    /// Optimizer steps per epoch (with sample packing, the first epoch's).
    pub steps_per_epoch: u64,
    /// With sample packing, every epoch's steps: epochs differ a little in their number of
    /// packs, and the data cursor (`epoch_index`, `step_in_epoch`) follows them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub epoch_steps: Vec<u64>,
    /// Optimizer steps in the run.
    pub max_steps: u64,
}

impl RunIdentity {
    /// The identity of a run training `train` on `(model, tokenizer)` digests.
    pub fn new(digests: (Hash, Hash), train: &[Example], epochs: &EpochSteps, max_steps: u64) -> Self {
        let mut h = Sha256::new();
        for e in train {
            h.update((e.input_ids.len() as u64).to_le_bytes());
            e.input_ids.iter().for_each(|t| h.update(t.to_le_bytes()));
            e.labels.iter().for_each(|l| h.update(l.to_le_bytes()));
        }
        Self {
            base_model_digest: hex(&digests.0),
            tokenizer_digest: hex(&digests.1),
            data_digest: hex(&h.finalize()),
            steps_per_epoch: epochs.first(),
            epoch_steps: match epochs {
                EpochSteps::Uniform(_) => Vec::new(),
                EpochSteps::Each(steps) => steps.clone(),
            },
            max_steps,
        }
    }

    /// Where each step lies in its epoch.
    pub fn epochs(&self) -> EpochSteps {
        match self.epoch_steps.is_empty() {
            true => EpochSteps::Uniform(self.steps_per_epoch),
            false => EpochSteps::Each(self.epoch_steps.clone()),
        }
    }
}

/// `trainer_state.json`.
#[derive(Debug, Serialize, Deserialize)]
struct TrainerState {
    /// Optimizer steps done.
    global_step: u64,
    /// Epochs done, as a fraction (transformers' `epoch`).
    epoch: f64,
    /// The 0-based epoch the last step belongs to, and the steps of it done: the data cursor.
    epoch_index: u64,
    step_in_epoch: u64,
    /// Ranks that trained it.
    world_size: usize,
    /// Digest of the LoRA weights and AdamW state every replica agreed on.
    state_digest: String,
    #[serde(flatten)]
    identity: RunIdentity,
    /// The effective configuration.
    config: TrainConfig,
}

/// What a checkpoint holds, as the replicas sent it.
pub struct Saved<'a> {
    /// Optimizer steps done.
    pub step: u64,
    /// `adapter_config.json`.
    pub adapter_config: String,
    /// `adapter_model.safetensors`.
    pub adapter: &'a [u8],
    /// `optimizer.safetensors`.
    pub optimizer: &'a [u8],
    /// The replicas' agreed digest.
    pub digest: Hash,
}

/// Writes `checkpoint-STEP` and prunes beyond `save_total_limit` once it is complete.
pub fn save(config: &TrainConfig, identity: &RunIdentity, saved: &Saved<'_>) -> Result<PathBuf> {
    let epochs = identity.epochs();
    let (epoch_index, index, _) = epochs.locate(saved.step);
    let state = TrainerState {
        global_step: saved.step,
        epoch: epochs.epochs_done(saved.step),
        epoch_index,
        step_in_epoch: index + 1,
        world_size: config.workers,
        state_digest: hex(&saved.digest),
        identity: identity.clone(),
        config: config.clone(),
    };
    let state = serde_json::to_string_pretty(&state)?;
    let files: [(&str, &[u8]); 4] = [
        (lorafleet_common::peft::WEIGHTS_FILE, saved.adapter),
        (lorafleet_common::peft::CONFIG_FILE, saved.adapter_config.as_bytes()),
        (OPTIMIZER_FILE, saved.optimizer),
        (STATE_FILE, state.as_bytes()),
    ];
    Ok(run_checkpoint::write(&config.output_dir, saved.step, &files, config.save_total_limit)?)
}

/// A verified checkpoint of this run, ready to hand to the replicas.
pub struct Resume {
    /// Its folder.
    pub dir: PathBuf,
    /// The state it holds, where training picks up.
    pub state: SavedState,
}

/// Settings that may change between a run and its resume: where files are, how often to log,
/// evaluate and save, what to do at the end, and where and how wide to compute (the last two
/// keep the result equal within float rounding; see `resume`'s warning).
const MAY_CHANGE: &[&str] = &[
    "base_model",
    "data_path",
    "output_dir",
    "eval_data_path",
    "eval_steps",
    "save_steps",
    "save_total_limit",
    "logging_steps",
    "merge",
    "eval_exact_match",
    "eval_max_new_tokens",
    "workers",
    "device",
    "gradient_checkpointing",
    "strict",
    "datasets",
];

/// Finds the checkpoint `spec` names (`latest`: the newest in `output_dir`), skipping torn or
/// corrupt ones with a warning, and refuses one that another run wrote.
pub fn resume(spec: &str, config: &TrainConfig, identity: &RunIdentity, warn: impl Fn(&str)) -> Result<Resume> {
    let found = run_checkpoint::resolve(spec, &config.output_dir)?;
    let skipped = found.as_ref().map_or(&[][..], |f| &f.skipped[..]);
    for (dir, why) in skipped {
        warn(&format!("warning: skipping checkpoint {}: {why}; trying the previous one", dir.display()));
    }
    let Some(found) = found else {
        let where_ = if spec == "latest" { config.output_dir.display().to_string() } else { spec.to_owned() };
        bail!("no checkpoint to resume from at {where_}: none of its checkpoint-STEP folders is complete and intact");
    };
    let dir = found.dir;
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let state: TrainerState =
        serde_json::from_str(&text).with_context(|| format!("{}: not a lorafleet trainer state", path.display()))?;
    let differences = differences(&state, config, identity);
    if !differences.is_empty() {
        bail!(
            "{} belongs to another run: {}; resume with the settings it was trained with, or start the new run \
             in another output_dir",
            dir.display(),
            differences.join("; ")
        );
    }
    if state.global_step >= identity.max_steps {
        bail!("{} is at step {}, the run's last: nothing to resume", dir.display(), state.global_step);
    }
    if state.world_size != config.workers || state.config.device != config.device {
        warn(&format!(
            "note: checkpoint written by {} worker(s) on {}, resuming on {} on {}: the result equals an \
             uninterrupted run within float rounding, not bit for bit",
            state.world_size, state.config.device, config.workers, config.device
        ));
    }
    let digest: Hash = parse_hex(&state.state_digest)
        .with_context(|| format!("{}: field `state_digest` is not a SHA-256", path.display()))?;
    let read = |name: &str| std::fs::read(dir.join(name)).with_context(|| format!("{}", dir.join(name).display()));
    let saved = SavedState {
        step: state.global_step,
        digest: Some(digest),
        adapter: read(lorafleet_common::peft::WEIGHTS_FILE)?.into(),
        optimizer: read(OPTIMIZER_FILE)?.into(),
    };
    Ok(Resume { dir, state: saved })
}

/// Each way the checkpoint's run differs from this one, as `what: checkpoint X, now Y`.
fn differences(state: &TrainerState, config: &TrainConfig, identity: &RunIdentity) -> Vec<String> {
    let mut out = Vec::new();
    let theirs = &state.identity;
    for (what, a, b) in [
        ("base model", &theirs.base_model_digest, &identity.base_model_digest),
        ("tokenizer", &theirs.tokenizer_digest, &identity.tokenizer_digest),
        (
            "training data (after templating, cutoff_len and the validation split)",
            &theirs.data_digest,
            &identity.data_digest,
        ),
    ] {
        if a != b {
            out.push(format!("{what}: checkpoint {}, now {}", &a[..a.len().min(12)], &b[..b.len().min(12)]));
        }
    }
    for (what, a, b) in [
        ("steps per epoch", theirs.steps_per_epoch, identity.steps_per_epoch),
        ("total steps", theirs.max_steps, identity.max_steps),
    ] {
        if a != b {
            out.push(format!("{what}: checkpoint {a}, now {b}"));
        }
    }
    if theirs.epoch_steps != identity.epoch_steps {
        let (a, b) = (&theirs.epoch_steps, &identity.epoch_steps);
        out.push(format!("steps of each packed epoch: checkpoint {a:?}, now {b:?}"));
    }
    let (Ok(serde_json::Value::Object(old)), Ok(serde_json::Value::Object(new))) =
        (serde_json::to_value(&state.config), serde_json::to_value(config))
    else {
        return out;
    };
    for (key, value) in &new {
        let was = old.get(key).unwrap_or(&serde_json::Value::Null);
        if !MAY_CHANGE.contains(&key.as_str()) && was != value {
            out.push(format!("{key}: checkpoint {was}, now {value}"));
        }
    }
    out
}

fn parse_hex(s: &str) -> Option<Hash> {
    let bytes: Vec<u8> =
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect::<Option<_>>()?;
    bytes.try_into().ok()
}

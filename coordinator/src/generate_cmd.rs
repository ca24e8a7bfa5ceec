//! `coordinator generate`: load a base once, any number of adapters, decode with one.

use crate::cli::GenerateArgs;
use anyhow::{bail, Context, Result};
use lorafleet_common::data::chat_template::ChatTemplate;
use lorafleet_common::data::{Message, PromptTemplate};
use lorafleet_common::ModelConfig;
use lorafleet_worker::adapter_io::load_adapter;
use lorafleet_worker::device;
use lorafleet_worker::generate::{generate, Sampling};
use lorafleet_worker::{LoraAdapter, Tokenizer};
use std::io::Write;
use std::path::PathBuf;

pub fn run(args: GenerateArgs) -> Result<()> {
    let device = device::parse(&args.device.device)?;
    let model = device::load_model(&args.base, &device, args.device.base_precision())?;
    let tokenizer = Tokenizer::from_dir(&args.base, model.config())?;
    let adapters = load_adapters(&args.adapters, model.config(), &device)?;
    let active = select(&adapters, args.use_adapter.as_deref())?;
    let ids = match (&args.prompt, &args.instruction, &args.chat) {
        (Some(p), _, _) => tokenizer.encode(p, true)?,
        (None, Some(i), _) => {
            tokenizer.encode(&PromptTemplate::alpaca().render(i, args.input.as_deref().unwrap_or("")), true)?
        }
        (None, None, Some(message)) => {
            let Some(template) = ChatTemplate::from_dir(&args.base)? else {
                bail!("{}: the model has no chat template; use --prompt or --instruction", args.base.display())
            };
            let turn = |role: &str, content: &str| Message { role: role.into(), content: content.into() };
            let mut messages: Vec<Message> = args.system.iter().map(|s| turn("system", s)).collect();
            messages.push(turn("user", message));
            // The template writes the BOS itself, as transformers' apply_chat_template does.
            tokenizer.encode(&template.render(&messages, true).map_err(anyhow::Error::msg)?, false)?
        }
        (None, None, None) => bail!("give --prompt, --instruction or --chat"),
    };
    let sampling = Sampling {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    };
    let out = generate(&model, active, &ids, &tokenizer.eos_ids, &sampling)?;
    let text = tokenizer.decode(&out.ids)?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}")?;
    Ok(())
}

/// Loads `[NAME=]DIR` adapters, keeping their names.
fn load_adapters(
    specs: &[String],
    config: &ModelConfig,
    device: &candle_core::Device,
) -> Result<Vec<(String, LoraAdapter)>> {
    let mut out: Vec<(String, LoraAdapter)> = Vec::new();
    for spec in specs {
        let (name, dir) = match spec.split_once('=') {
            Some((n, d)) if !n.is_empty() && !n.contains('/') => (n.to_owned(), PathBuf::from(d)),
            _ => {
                let dir = PathBuf::from(spec);
                let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| spec.clone());
                (name, dir)
            }
        };
        if out.iter().any(|(n, _)| *n == name) {
            bail!("two adapters are named {name:?}; name them with --adapter NAME=DIR");
        }
        let adapter = load_adapter(&dir, config, device).with_context(|| format!("loading adapter {name:?}"))?;
        out.push((name, adapter));
    }
    Ok(out)
}

/// The adapter `--use` names (PEFT's `set_adapter`), the first one by default, none for `base`.
fn select<'a>(adapters: &'a [(String, LoraAdapter)], name: Option<&str>) -> Result<Option<&'a LoraAdapter>> {
    match name {
        None => Ok(adapters.first().map(|(_, a)| a)),
        Some("base") if !adapters.iter().any(|(n, _)| n == "base") => Ok(None),
        Some(n) => match adapters.iter().find(|(a, _)| a == n) {
            Some((_, a)) => Ok(Some(a)),
            None => {
                let known: Vec<&str> = adapters.iter().map(|(n, _)| n.as_str()).collect();
                bail!("--use {n}: no adapter of that name (loaded: {known:?})")
            }
        },
    }
}

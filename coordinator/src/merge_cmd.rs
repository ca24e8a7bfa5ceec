//! `coordinator merge`: fold an adapter into its base.

use crate::cli::MergeArgs;
use crate::runtime;
use anyhow::Result;
use lorafleet_common::ModelConfig;
use lorafleet_worker::merge::merge;
use std::path::Path;

pub fn run(args: MergeArgs) -> Result<()> {
    let dtype = match &args.dtype {
        Some(d) => runtime::parse_dtype(d)?,
        None => base_dtype(&args.base)?,
    };
    let max_shard = runtime::parse_size(&args.max_shard_size)?;
    let report = merge(&args.base, &args.adapter, &args.out, dtype, max_shard)?;
    eprintln!(
        "merged {} weight matrices; wrote {} tensors in {} shard(s) to {}",
        report.merged,
        report.tensors,
        report.shards,
        args.out.display()
    );
    Ok(())
}

/// `train --merge`: the merge with `coordinator merge`'s defaults (the base's dtype, 5 GB shards).
pub fn merge_with_defaults(base: &Path, adapter: &Path, out: &Path) -> Result<()> {
    merge(base, adapter, out, base_dtype(base)?, runtime::parse_size("5GB")?)?;
    Ok(())
}

fn base_dtype(base: &Path) -> Result<candle_core::DType> {
    let config = ModelConfig::from_dir(base)?;
    Ok(config.dtype.as_deref().map(runtime::parse_dtype).transpose()?.unwrap_or(candle_core::DType::F32))
}

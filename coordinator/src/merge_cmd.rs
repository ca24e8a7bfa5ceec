//! `coordinator merge`: fold an adapter into its base.

use crate::cli::MergeArgs;
use crate::runtime;
use anyhow::Result;
use lorafleet_common::ModelConfig;
use lorafleet_worker::merge::merge;

pub fn run(args: MergeArgs) -> Result<()> {
    let dtype = match &args.dtype {
        Some(d) => runtime::parse_dtype(d)?,
        None => {
            let config = ModelConfig::from_dir(&args.base)?;
            config.dtype.as_deref().map(runtime::parse_dtype).transpose()?.unwrap_or(candle_core::DType::F32)
        }
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

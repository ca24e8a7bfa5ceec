//! `coordinator eval`: loss and perplexity over answer tokens, optionally exact match.

use crate::cli::EvalArgs;
use anyhow::Result;
use lorafleet_common::data::{read_records, tokenize_records, Template, TokenizeOptions};
use lorafleet_worker::adapter_io::load_adapter;
use lorafleet_worker::device;
use lorafleet_worker::eval::{eval_loss, exact_match};
use lorafleet_worker::Tokenizer;
use serde_json::json;

pub fn run(args: EvalArgs) -> Result<()> {
    let device = device::parse(&args.device.device)?;
    let template = Template::resolve(&args.template, &args.base)?;
    let model = device::load_model(&args.base, &device, args.device.base_precision())?;
    let tokenizer = Tokenizer::from_dir(&args.base, model.config())?;
    let adapter = args.adapter.as_deref().map(|dir| load_adapter(dir, model.config(), &device)).transpose()?;
    let records = read_records(&args.data)?;
    let options = TokenizeOptions { cutoff_len: args.cutoff_len, train_on_inputs: false, drop_long: false };
    let (examples, report) = tokenize_records(&args.data, &records, &template, &tokenizer, &options)?;
    let loss = eval_loss(&model, adapter.as_ref(), &examples, tokenizer.pad_id, args.batch_size)?;
    let exact = if args.exact_match {
        let pairs: Vec<(String, String)> = records.iter().filter_map(|r| template.prompt_and_answer(r)).collect();
        Some(exact_match(&model, adapter.as_ref(), &tokenizer, &pairs, args.max_new_tokens)?)
    } else {
        None
    };
    let mean = loss.mean();
    if args.json {
        let v = json!({"examples": report.kept, "tokens": loss.tokens, "loss": mean, "perplexity": mean.exp(), "exact_match": exact});
        println!("{v}");
    } else {
        println!("examples    {} ({} truncated, {} dropped)", report.kept, report.truncated, report.dropped);
        println!("tokens      {}", loss.tokens);
        println!("loss        {mean:.6}");
        println!("perplexity  {:.4}", mean.exp());
        if let Some(e) = exact {
            println!("exact match {:.2}%", 100.0 * e);
        }
    }
    Ok(())
}

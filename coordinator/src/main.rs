//! `coordinator`: the lorafleet command line (train, eval, generate, merge).

mod alloc;
mod bench_cmd;
mod bench_ours;
mod bench_reference;
mod bench_scaling;
mod cli;
mod cluster;
mod eval_cmd;
mod generate_cmd;
mod merge_cmd;
mod metrics;
mod runtime;
mod schedule;
mod train;
mod train_args;

use clap::Parser;

fn main() -> std::process::ExitCode {
    alloc::keep_freed_memory();
    let cli = cli::Cli::parse();
    runtime::init_logging(cli.verbose);
    // candle's autograd walks the graph recursively: give it a deep stack.
    let worker = std::thread::Builder::new()
        .name("lorafleet-main".into())
        .stack_size(256 << 20)
        .spawn(move || run(cli))
        .expect("spawning the main thread");
    match worker.join() {
        Ok(Ok(())) => std::process::ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
        Err(_) => std::process::ExitCode::FAILURE,
    }
}

fn run(cli: cli::Cli) -> anyhow::Result<()> {
    match cli.command {
        None => train::run(cli.train),
        Some(cli::Command::Train(flags)) => train::run(*flags),
        Some(cli::Command::Eval(args)) => eval_cmd::run(args),
        Some(cli::Command::Generate(args)) => generate_cmd::run(args),
        Some(cli::Command::Merge(args)) => merge_cmd::run(args),
        Some(cli::Command::Bench(args)) => bench_cmd::run(args),
        Some(cli::Command::Keygen { dir }) => {
            println!("{}", cluster::tls::load_or_create(&dir)?.fingerprint);
            Ok(())
        }
    }
}

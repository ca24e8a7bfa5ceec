//! `--workers N` / `--listen ADDR`: the schedule driven over QUIC with worker processes.
//!
//! A thin shell: connection tasks (`server`) turn frames into schedule events; this loop
//! feeds them to the schedule with the time, sends the commands it emits (with their data,
//! `train::wire`) and hands everything else to the `Sink`.

mod fleet;
mod launch;
mod server;
pub mod tls;

use crate::schedule::{Action, Event, Schedule};
use crate::train::sink::Sink;
use crate::train::wire::Wire;
use anyhow::{Context, Result};
use lorafleet_common::config::TrainConfig;
use lorafleet_worker::link;
use server::{Outgoing, Secrets, ShellEvent};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How the distributed run is reached (not part of the run's configuration).
#[derive(clap::Args, Debug, Default, Clone)]
pub struct LaunchFlags {
    /// Wait for `--workers` remote workers on this UDP address (QUIC) instead of starting
    /// local worker processes.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Join token workers must prove (default: a random one, printed at start).
    #[arg(long, env = "LORAFLEET_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Read the join token from this file.
    #[arg(long, conflicts_with = "token")]
    pub token_file: Option<PathBuf>,
    /// Keep the certificate here (`cert.der`, `key.der`; created on first use) so its
    /// fingerprint stays the same across restarts.
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
    /// Seconds without any message (heartbeats come every second) before a worker is lost.
    #[arg(long, default_value_t = 60)]
    pub heartbeat_timeout: u64,
    /// Seconds to wait for a replacement when a worker is lost after the start (a restarted
    /// local process, or a new `worker --join`); then every rank goes back to the last
    /// checkpoint and the run goes on. 0: a lost worker stops the run.
    #[arg(long = "rejoin_timeout", visible_alias = "rejoin-timeout", default_value_t = 120)]
    pub rejoin_timeout: u64,
    /// Seconds a step may take before its ranks are regrouped (a rank alive but stuck); one
    /// that does not answer the regroup within as long is fenced and replaced. Default: 20
    /// times the longest step so far, at least 60 (30 minutes for the first step).
    #[arg(long = "step_timeout", visible_alias = "step-timeout")]
    pub step_timeout: Option<u64>,
    /// When no replacement comes for a lost worker, go on with this many workers or more (the
    /// same global batch, more accumulation per rank) instead of stopping.
    #[arg(long = "min_workers", visible_alias = "min-workers")]
    pub min_workers: Option<usize>,
    /// Local worker processes restarted after they die, over the whole run.
    #[arg(long = "max_restarts", visible_alias = "max-restarts", default_value_t = 3)]
    pub max_restarts: usize,
    /// The run's label in metrics and logs (default: random).
    #[arg(long)]
    pub run_id: Option<String>,
    /// Serve Prometheus metrics on this address at /metrics (`0`: off).
    #[arg(long, default_value = crate::metrics::DEFAULT_ADDR)]
    pub metrics_addr: String,
    /// Keep /metrics up this many seconds after the run ends, so a scraper sees the final
    /// values.
    #[arg(long, default_value_t = 0)]
    pub metrics_linger: u64,
}

impl LaunchFlags {
    fn token(&self) -> Result<String> {
        if let Some(t) = &self.token {
            return Ok(t.clone());
        }
        if let Some(path) = &self.token_file {
            let t = std::fs::read_to_string(path).with_context(|| format!("--token-file {}", path.display()))?;
            anyhow::ensure!(!t.trim().is_empty(), "--token-file {}: the file is empty", path.display());
            return Ok(t.trim().to_owned());
        }
        Ok(lorafleet_common::protocol::hex(&rand::random::<[u8; 16]>()))
    }
}

/// Runs the schedule over QUIC until it is over.
pub fn run(
    config: &TrainConfig,
    flags: &LaunchFlags,
    schedule: Schedule,
    wire: &Wire,
    sink: &mut Sink<'_>,
) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the network runtime")?;
    runtime.block_on(drive(config, flags, schedule, wire, sink))
}

async fn drive(
    config: &TrainConfig,
    flags: &LaunchFlags,
    mut schedule: Schedule,
    wire: &Wire,
    sink: &mut Sink<'_>,
) -> Result<()> {
    let identity = match &flags.tls_dir {
        Some(dir) => tls::load_or_create(dir)?,
        None => tls::generate()?,
    };
    let secrets = Arc::new(Secrets { token: flags.token()?, fingerprint: identity.fingerprint.clone() });
    let listen = flags.listen.unwrap_or_else(|| "127.0.0.1:0".parse().expect("literal"));
    let server = link::server_config(identity.cert, identity.key)?;
    let endpoint = quinn::Endpoint::server(server, listen).with_context(|| format!("listening on {listen}"))?;
    let addr = endpoint.local_addr()?;
    let join = format!("lorafleet://{}@{addr}/{}", secrets.token, secrets.fingerprint);
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(server::accept(endpoint.clone(), secrets.clone(), events_tx.clone()));
    let mut fleet = None;
    if flags.listen.is_none() {
        sink.say(&format!("starting {} local workers", config.workers));
        let device = config.device.clone();
        fleet = Some(fleet::Fleet::start(config.workers, join.clone(), device, flags.max_restarts, events_tx.clone())?);
    } else {
        sink.say(&format!(
            "coordinator listening on {addr} (QUIC), certificate fingerprint {}\n\
             waiting for {} worker(s): worker --join {addr} --token {} --fingerprint {}\n\
             join string: {join}",
            secrets.fingerprint, config.workers, secrets.token, secrets.fingerprint
        ));
    }
    drop(events_tx);
    let mut conns: HashMap<u64, tokio::sync::mpsc::UnboundedSender<Outgoing>> = HashMap::new();
    let result = loop {
        if let Some(done) = act(&mut schedule, wire, sink, &conns, fleet.as_mut()) {
            break done;
        }
        let deadline = schedule.poll_timeout().map(tokio::time::Instant::from_std);
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            // Events first: after a long blocking action (writing a checkpoint, merging) the
            // heartbeats that arrived meanwhile must be seen before any deadline is judged.
            biased;
            event = events.recv() => match event {
                Some(ShellEvent::Attached(id, tx)) => { conns.insert(id, tx); }
                Some(ShellEvent::Schedule(e)) => schedule.handle(e, Instant::now()),
                Some(ShellEvent::Exited(slot, name, status)) if !schedule.is_over() => {
                    schedule.handle(Event::Exited { name: name.clone(), status: status.clone() }, Instant::now());
                    let Some(fleet) = fleet.as_mut() else { continue };
                    match fleet.exited(slot, &name) {
                        Ok(Some(new)) => sink.say(&format!("local worker {name} exited ({status}); started {new}")),
                        Ok(None) => schedule.no_replacement(format!(
                            "local worker {name} exited ({status}) and the {} restarts of --max_restarts are used up",
                            flags.max_restarts
                        )),
                        Err(e) => schedule.stop(format!("local worker {name} exited ({status}); restarting it: {e:#}")),
                    }
                }
                Some(ShellEvent::Exited(..)) => {}
                None => break Err(anyhow::anyhow!("the QUIC endpoint stopped")),
            },
            () = sleep => schedule.handle_timeout(Instant::now()),
        }
    };
    // Let the shutdown messages go out and the workers close their side.
    drop(conns);
    let _ = tokio::time::timeout(Duration::from_secs(5), endpoint.wait_idle()).await;
    endpoint.close(link::CLOSE_DONE.into(), b"run over");
    result
}

/// Executes the schedule's pending actions; `Some` when the run is over.
fn act(
    schedule: &mut Schedule,
    wire: &Wire,
    sink: &mut Sink<'_>,
    conns: &HashMap<u64, tokio::sync::mpsc::UnboundedSender<Outgoing>>,
    mut fleet: Option<&mut fleet::Fleet>,
) -> Option<Result<()>> {
    while let Some(action) = schedule.poll_action() {
        if let (Action::WorkerLost { name, .. }, Some(fleet)) = (&action, fleet.as_deref_mut()) {
            fleet.kill(name);
        }
        match action {
            Action::Send(id, cmd) => {
                if matches!(cmd, crate::schedule::Command::Step { .. }) {
                    sink.step_sent(Instant::now());
                }
                if let Some(tx) = conns.get(&id) {
                    let _ = tx.send(Outgoing::Message(wire.message(cmd)));
                }
            }
            Action::Drop(id, reason) => {
                if let Some(tx) = conns.get(&id) {
                    let _ = tx.send(Outgoing::Close(reason));
                }
            }
            other => {
                if let Some(done) = sink.handle(&other) {
                    return Some(done);
                }
            }
        }
    }
    None
}

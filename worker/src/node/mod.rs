//! The `worker` process: joins a coordinator over QUIC, then trains its replica on command.
//!
//! Two threads of control: the network side (tokio) reads commands, writes results and
//! sends a heartbeat every second whatever the compute side is doing; the compute side
//! (one OS thread, [`compute`]) owns the model and the replica and runs one command at a
//! time. A worker keeps no data set and no plan: everything arrives in commands.

mod compute;
mod resources;

pub use resources::process_status_bytes;

use crate::link::{self, LinkError};
use lorafleet_common::config::TrainConfig;
use lorafleet_common::protocol::{
    join_proof, ToCoordinator, ToWorker, MAX_FRAME, MAX_HANDSHAKE_FRAME, PROTOCOL_VERSION,
};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// `worker --join ADDR --token T --fingerprint F`.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "worker", version, about = "A lorafleet training worker: joins a coordinator and trains on command")]
pub struct Args {
    /// The coordinator, `HOST:PORT`, or the join string it printed
    /// (`lorafleet://TOKEN@HOST:PORT/FINGERPRINT`).
    #[arg(long)]
    pub join: String,
    /// The run's join token.
    #[arg(long, env = "LORAFLEET_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// SHA-256 fingerprint of the coordinator's certificate (printed at its start).
    #[arg(long, env = "LORAFLEET_FINGERPRINT")]
    pub fingerprint: Option<String>,
    /// Device to train on (`cpu`, `cuda`, `cuda:N`); default: the run's `device`.
    #[arg(long)]
    pub device: Option<String>,
    /// Where the base model folder is on this machine; default: the run's `base_model`.
    #[arg(long)]
    pub base_model: Option<PathBuf>,
    /// Name in the coordinator's logs and metrics (default: host-pid).
    #[arg(long)]
    pub name: Option<String>,
    /// Address the ring collective listens on (default: this machine's address towards the
    /// coordinator).
    #[arg(long)]
    pub ring_ip: Option<IpAddr>,
    /// Exit as soon as standard input closes. A coordinator that starts local workers holds
    /// their inputs open, so they end with it even when it is killed with SIGKILL (which
    /// runs no clean-up); otherwise they would wait out the connection's 60 s idle timeout.
    #[arg(long)]
    pub exit_with_stdin: bool,
}

/// Why a worker stopped.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Bad arguments.
    #[error("{0}")]
    Args(String),
    /// The coordinator refused this worker or the connection failed.
    #[error("{0}")]
    Link(#[from] LinkError),
    /// The coordinator sent something out of order.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The run's configuration is unusable here.
    #[error(transparent)]
    Config(#[from] lorafleet_common::FormatError),
    /// The replica failed; the coordinator was told.
    #[error("{0}")]
    Compute(String),
}

/// Where to connect and how to prove it.
#[derive(Debug, PartialEq)]
struct Join {
    addr: String,
    token: String,
    fingerprint: String,
}

impl Args {
    fn join(&self) -> Result<Join, NodeError> {
        let (addr, token, fingerprint) = match self.join.strip_prefix("lorafleet://") {
            Some(rest) => {
                let bad = || {
                    NodeError::Args(format!("--join {}: expected lorafleet://TOKEN@HOST:PORT/FINGERPRINT", self.join))
                };
                let (token, rest) = rest.split_once('@').ok_or_else(bad)?;
                let (addr, fp) = rest.rsplit_once('/').ok_or_else(bad)?;
                (addr.to_owned(), Some(token.to_owned()), Some(fp.to_owned()))
            }
            None => (self.join.clone(), None, None),
        };
        let token = self.token.clone().or(token).ok_or_else(|| {
            NodeError::Args("no join token: pass --token, set LORAFLEET_TOKEN or use the join string".into())
        })?;
        let fingerprint = self.fingerprint.clone().or(fingerprint).ok_or_else(|| {
            NodeError::Args(
                "no certificate fingerprint: pass --fingerprint, set LORAFLEET_FINGERPRINT or use the join string"
                    .into(),
            )
        })?;
        let fingerprint = link::normalize_fingerprint(&fingerprint);
        if fingerprint.len() != 64 {
            return Err(NodeError::Args(format!(
                "--fingerprint: expected 64 hex digits (SHA-256), got {}",
                fingerprint.len()
            )));
        }
        Ok(Join { addr, token, fingerprint })
    }
}

/// Runs a worker to the end of its run.
pub fn run(args: Args) -> Result<(), NodeError> {
    let join = args.join()?;
    if args.exit_with_stdin {
        exit_when_stdin_closes();
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| NodeError::Args(format!("starting the network runtime: {e}")))?;
    runtime.block_on(session(args, join))
}

async fn session(args: Args, join: Join) -> Result<(), NodeError> {
    let setup = |e: std::io::Error| LinkError::Setup(format!("{}: {e}", join.addr));
    let remote = tokio::net::lookup_host(&join.addr)
        .await
        .map_err(setup)?
        .next()
        .ok_or_else(|| NodeError::Args(format!("--join {}: the name resolves to no address", join.addr)))?;
    let mut endpoint = quinn::Endpoint::client(any_port_towards(remote)).map_err(setup)?;
    endpoint.set_default_client_config(link::client_config(&join.fingerprint)?);
    let connecting =
        endpoint.connect(remote, link::SERVER_NAME).map_err(|e| LinkError::Setup(format!("{remote}: {e}")))?;
    let conn = connecting.await.map_err(|e| LinkError::Closed(format!("connecting to {remote}: {e}")))?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| LinkError::Closed(e.to_string()))?;

    let name = args.name.clone().unwrap_or_else(default_name);
    link::write_frame(&mut send, &ToCoordinator::Hello { name: name.clone() }).await?;
    let nonce = match link::read_frame(&mut recv, MAX_HANDSHAKE_FRAME).await? {
        ToWorker::Challenge { nonce } => nonce,
        other => return Err(unexpected(&other)),
    };
    let mac = join_proof(&join.token, &nonce, &join.fingerprint);
    link::write_frame(&mut send, &ToCoordinator::Proof { mac }).await?;
    let (rank, world, run_id, config_toml) = match link::read_frame(&mut recv, MAX_FRAME).await {
        Ok(ToWorker::Welcome { rank, world, run_id, config_toml }) => (rank, world, run_id, config_toml),
        Ok(other) => return Err(unexpected(&other)),
        Err(e) => {
            // The coordinator says why in its close frame.
            let why = match conn.close_reason() {
                Some(quinn::ConnectionError::ApplicationClosed(c)) => String::from_utf8_lossy(&c.reason).into_owned(),
                Some(other) => other.to_string(),
                None => e.to_string(),
            };
            return Err(NodeError::Link(LinkError::Closed(format!("the coordinator refused this worker: {why}"))));
        }
    };
    let mut config = TrainConfig::from_toml_str(&config_toml, std::path::Path::new("<config from the coordinator>"))?;
    if let Some(dir) = &args.base_model {
        config.base_model = dir.clone();
    }
    if let Some(device) = &args.device {
        config.device = device.clone();
    }
    let ring_ip = match args.ring_ip {
        Some(ip) => ip,
        None => local_ip_towards(remote).map_err(setup)?,
    };
    eprintln!(
        "worker {name}: joined run {run_id} as rank {rank} of {world} (protocol {PROTOCOL_VERSION}); device {}",
        config.device
    );

    let (out_tx, mut out_rx) = tokio::sync::mpsc::unbounded_channel::<ToCoordinator>();
    let (cmd_tx, cmd_rx) = std::sync::mpsc::channel::<ToWorker>();
    let device_memory = resources::Shared::default();
    let abort = crate::ring::RingAbort::default();
    let job = compute::Job { config, rank: rank as usize, world: world as usize, ring_ip, abort: abort.clone() };
    let compute = std::thread::Builder::new()
        .name("compute".into())
        // candle's autograd walks the graph recursively: give it a deep stack.
        .stack_size(256 << 20)
        .spawn({
            let out = out_tx.clone();
            let memory = device_memory.clone();
            move || compute::serve(job, cmd_rx, out, memory)
        })
        .map_err(|e| NodeError::Compute(format!("starting the compute thread: {e}")))?;
    let writer = tokio::spawn(async move {
        while let Some(msg) = out_rx.recv().await {
            link::write_frame(&mut send, &msg).await?;
        }
        Ok::<_, LinkError>(())
    });
    let heartbeat = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            if out_tx.send(ToCoordinator::Heartbeat(device_memory.snapshot())).is_err() {
                break;
            }
        }
    });
    let outcome = loop {
        match link::read_frame::<ToWorker>(&mut recv, MAX_FRAME).await {
            Ok(ToWorker::Shutdown { reason }) => {
                eprintln!("worker {name}: {reason}");
                break Ok(());
            }
            Ok(cmd) => {
                if matches!(cmd, ToWorker::Regroup { .. }) {
                    // The compute thread may be blocked in a collective with a lost peer.
                    abort.trip();
                }
                if cmd_tx.send(cmd).is_err() {
                    // The compute thread stopped after reporting its error; wait for the
                    // coordinator's shutdown.
                    continue;
                }
            }
            Err(e) => break Err(NodeError::Link(LinkError::Closed(format!("lost the coordinator: {e}")))),
        }
    };
    heartbeat.abort();
    drop(cmd_tx);
    conn.close(link::CLOSE_DONE.into(), b"bye");
    writer.abort();
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    // A compute thread stuck in a collective whose peers are gone is abandoned with the process.
    if compute.is_finished() {
        if let Ok(Err(e)) = compute.join() {
            return Err(NodeError::Compute(e));
        }
    }
    outcome
}

/// Watches standard input from a thread of its own: end of file (or an error) ends the process.
fn exit_when_stdin_closes() {
    let _ = std::thread::Builder::new().name("lifeline".into()).spawn(|| {
        let mut buf = [0u8; 64];
        while matches!(std::io::Read::read(&mut std::io::stdin(), &mut buf), Ok(n) if n > 0) {}
        eprintln!("worker: the coordinator that started this worker is gone; exiting");
        std::process::exit(3);
    });
}

fn unexpected(msg: &ToWorker) -> NodeError {
    NodeError::Protocol(format!("unexpected message {}", lorafleet_common::protocol::brief(msg, 80)))
}

fn default_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "worker".into());
    format!("{host}-{}", std::process::id())
}

/// Any local address and port of `remote`'s family.
fn any_port_towards(remote: SocketAddr) -> SocketAddr {
    let ip: IpAddr =
        if remote.is_ipv6() { std::net::Ipv6Addr::UNSPECIFIED.into() } else { std::net::Ipv4Addr::UNSPECIFIED.into() };
    SocketAddr::new(ip, 0)
}

/// The local address the OS would use to reach `remote` (no packet is sent).
fn local_ip_towards(remote: SocketAddr) -> std::io::Result<IpAddr> {
    let socket = std::net::UdpSocket::bind(any_port_towards(remote))?;
    socket.connect(remote)?;
    Ok(socket.local_addr()?.ip())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn join_strings_and_flags() {
        let fp = "AB".repeat(32);
        let a = Args::parse_from(["worker", "--join", &format!("lorafleet://t0k@10.0.0.1:7070/{fp}")]);
        let j = a.join().unwrap();
        assert_eq!(j, Join { addr: "10.0.0.1:7070".into(), token: "t0k".into(), fingerprint: "ab".repeat(32) });
        let b = Args::parse_from(["worker", "--join", "h:1", "--token", "x", "--fingerprint", "12:34"]);
        assert!(b.join().unwrap_err().to_string().contains("64 hex digits"));
        let c = Args::parse_from(["worker", "--join", "lorafleet://nope"]);
        assert!(c.join().unwrap_err().to_string().contains("expected lorafleet://"));
    }
}

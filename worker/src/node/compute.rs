//! The worker's compute thread: loads the model, forms the collective, then executes the
//! coordinator's commands one at a time on its replica.

use super::resources::{self, Shared};
use crate::collective::Collective;
use crate::error::{Error, Result};
use crate::executor::Executor;
use crate::identity::{model_digest, tokenizer_digest};
use crate::ring::{Ring, RingAbort};
use crate::{device, Tokenizer};
use candle_core::Device;
use lorafleet_common::config::TrainConfig;
use lorafleet_common::protocol::{Identity, ToCoordinator, ToWorker};
use std::net::IpAddr;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedSender;

/// What the coordinator's welcome settled (rank and world change when it regroups).
pub(crate) struct Job {
    pub config: TrainConfig,
    pub rank: usize,
    pub world: usize,
    pub ring_ip: IpAddr,
    /// Tripped by the network side when the coordinator regroups the ranks.
    pub abort: RingAbort,
}

/// Runs until the command channel closes; an error is reported to the coordinator (which
/// stops the run) and returned.
pub(crate) fn serve(
    job: Job,
    commands: Receiver<ToWorker>,
    out: UnboundedSender<ToCoordinator>,
    memory: Shared,
) -> Result<(), String> {
    serve_inner(job, &commands, &out, &memory).map_err(|e| {
        let message = e.to_string();
        let nonfinite = matches!(e, Error::NonFinite { .. });
        let _ = out.send(ToCoordinator::Failed { message: message.clone(), nonfinite });
        message
    })
}

fn send(out: &UnboundedSender<ToCoordinator>, msg: ToCoordinator) -> Result<()> {
    out.send(msg).map_err(|_| Error::Invalid("the network side has stopped".into()))
}

/// The model is loaded once; the group (ring or NCCL) is formed at the start and again at
/// every `Regroup`, after a rank was lost. A failed collective is not this worker's failure:
/// a peer is gone, the coordinator knows (or will, by its heartbeat) and will regroup.
fn serve_inner(
    mut job: Job,
    commands: &Receiver<ToWorker>,
    out: &UnboundedSender<ToCoordinator>,
    memory: &Shared,
) -> Result<()> {
    let config = job.config.clone();
    let device = device::parse(&config.device)?;
    let model = Arc::new(device::load_model(&config.base_model, &device, config.base_precision())?);
    let tokenizer = Tokenizer::from_dir(&config.base_model, model.config())?;
    let digests = (model_digest(&config.base_model)?, tokenizer_digest(&config.base_model)?);
    let Some(formed) = form_group(&device, &job, digests, commands, out)? else { return Ok(()) };
    let mut executor = Executor::new(&config, model, tokenizer, formed.unwrap_or_else(|| Box::new(Unformed)))?;
    note_memory(&device, memory);
    for cmd in commands {
        match cmd {
            ToWorker::Regroup { rank, world, generation } => {
                (job.rank, job.world) = (rank as usize, world as usize);
                eprintln!("worker: regrouping as rank {rank} of {world} (generation {generation})");
                let Some(formed) = form_group(&device, &job, digests, commands, out)? else { return Ok(()) };
                executor.set_collective(formed.unwrap_or_else(|| Box::new(Unformed)));
            }
            cmd => match executor.execute(cmd) {
                Ok(reply) => {
                    note_memory(&device, memory);
                    send(out, reply)?;
                }
                Err(Error::Collective(e)) => {
                    eprintln!("worker: the group broke ({e}); the step is abandoned until the coordinator regroups");
                }
                Err(e) => return Err(e),
            },
        }
    }
    Ok(())
}

/// Announces this generation's ring address (with the digests), waits for the peers,
/// connects and reports `Ready`. `None`: the coordinator is gone; `Some(None)`: a peer did
/// not come (lost while the group formed), so this worker waits for the next regroup.
fn form_group(
    device: &Device,
    job: &Job,
    (model, tokenizer): (lorafleet_common::protocol::Hash, lorafleet_common::protocol::Hash),
    commands: &Receiver<ToWorker>,
    out: &UnboundedSender<ToCoordinator>,
) -> Result<Option<Option<Box<dyn Collective>>>> {
    let listener = Ring::listen(job.ring_ip)?;
    let ring_addr = listener.local_addr().map_err(|e| Error::Collective(format!("ring listener: {e}")))?;
    let identity = Identity {
        model,
        tokenizer,
        device: job.config.device.clone(),
        ring_addr: ring_addr.to_string(),
        nccl_id: nccl_id(device, job.rank)?,
    };
    send(out, ToCoordinator::Identity(identity))?;
    let peers = match commands.recv() {
        Ok(ToWorker::Peers(p)) => p,
        Ok(other) => return Err(crate::executor::unexpected(&other)),
        Err(_) => return Ok(None),
    };
    match collective(device, job, listener, &peers) {
        Ok(group) => {
            send(out, ToCoordinator::Ready)?;
            Ok(Some(Some(group)))
        }
        Err(Error::Collective(e)) => {
            eprintln!("worker: the group did not form ({e}); waiting for the coordinator to regroup");
            Ok(Some(None))
        }
        Err(e) => Err(e),
    }
}

/// The group of a worker whose last regroup failed: every reduction fails (the coordinator
/// sends a new regroup before any step).
struct Unformed;

impl Collective for Unformed {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_grads(&mut self, _: candle_core::Tensor) -> Result<candle_core::Tensor> {
        Err(Error::Collective("no group: the last regroup did not complete".into()))
    }

    fn all_reduce_stats(&mut self, _: &mut [f64]) -> Result<()> {
        Err(Error::Collective("no group: the last regroup did not complete".into()))
    }
}

fn note_memory(device: &Device, memory: &Shared) {
    if let Some((used, total)) = resources::device_memory(device) {
        memory.set_device(used, total);
    }
}

/// Rank 0 of a GPU group creates the NCCL id that the coordinator hands to everyone.
#[cfg(feature = "nccl")]
fn nccl_id(device: &Device, rank: usize) -> Result<Option<Vec<u8>>> {
    if device.is_cuda() && rank == 0 {
        Ok(Some(crate::nccl::new_id()?))
    } else {
        Ok(None)
    }
}

#[cfg(not(feature = "nccl"))]
fn nccl_id(_device: &Device, _rank: usize) -> Result<Option<Vec<u8>>> {
    Ok(None)
}

/// NCCL between GPU workers when rank 0 offered an id, the TCP ring otherwise.
fn collective(
    device: &Device,
    job: &Job,
    listener: std::net::TcpListener,
    peers: &lorafleet_common::protocol::Peers,
) -> Result<Box<dyn Collective>> {
    #[cfg(feature = "nccl")]
    if let (true, Some(id)) = (device.is_cuda(), &peers.nccl_id) {
        drop(listener);
        return Ok(Box::new(crate::nccl::Nccl::connect(device, job.rank, job.world, id)?));
    }
    let _ = device;
    let ring = Ring::connect(listener, job.rank, job.world, &peers.ring, &peers.ring_key)?;
    job.abort.watch(&ring);
    Ok(Box::new(ring))
}

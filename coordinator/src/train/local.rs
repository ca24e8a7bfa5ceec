//! `--workers 1`: the schedule driven in this process, with one replica answering its
//! commands directly (no sockets, no second process, the same plan and files).

use super::sink::Sink;
use super::wire::Wire;
use crate::schedule::{Action, Command, Event, Schedule};
use anyhow::Result;
use lorafleet_common::config::TrainConfig;
use lorafleet_common::protocol::{Identity, ToCoordinator};
use lorafleet_worker::collective::SingleRank;
use lorafleet_worker::device;
use lorafleet_worker::executor::Executor;
use lorafleet_worker::Tokenizer;
use std::sync::Arc;
use std::time::Instant;

/// Trains with one in-process replica.
pub fn run(config: &TrainConfig, mut schedule: Schedule, wire: &Wire, sink: &mut Sink<'_>) -> Result<()> {
    let device = device::parse(&config.device)?;
    let model = Arc::new(device::load_model(&config.base_model, &device, config.base_precision())?);
    let tokenizer = Tokenizer::from_dir(&config.base_model, model.config())?;
    let mut executor = Executor::new(config, model, tokenizer, Box::new(SingleRank))?;
    schedule.handle(Event::Joined { id: 0, name: "in-process".into() }, Instant::now());
    loop {
        let Some(action) = schedule.poll_action() else {
            anyhow::bail!("the schedule stalled (a bug): no action and not finished");
        };
        let Action::Send(id, cmd) = action else {
            match sink.handle(&action) {
                Some(result) => return result,
                None => continue,
            }
        };
        let reply = match cmd {
            Command::Welcome { .. } => ToCoordinator::Identity(Identity {
                model: [0; 32],
                tokenizer: [0; 32],
                device: config.device.clone(),
                ring_addr: String::new(),
                nccl_id: None,
            }),
            Command::Peers { .. } => ToCoordinator::Ready,
            Command::Shutdown(_) => continue,
            cmd => {
                let step = match cmd {
                    Command::Step { step, .. } => Some(step),
                    _ => None,
                };
                if step.is_some() {
                    sink.step_sent(Instant::now());
                }
                match executor.execute(wire.message(cmd)) {
                    Ok(reply) => reply,
                    Err(e) => {
                        if matches!(e, lorafleet_worker::Error::NonFinite { .. }) {
                            sink.handle(&Action::NonFinite);
                        }
                        return Err(match step {
                            Some(step) => {
                                anyhow::anyhow!("training stopped at step {step}: {e}; no adapter was written")
                            }
                            None => anyhow::anyhow!("{e}"),
                        });
                    }
                }
            }
        };
        schedule.handle(Event::Message { id, msg: reply }, Instant::now());
    }
}

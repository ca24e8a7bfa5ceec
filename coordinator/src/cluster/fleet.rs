//! The local worker processes of `--workers N` (no `--listen`): started, watched, killed when
//! the schedule fences one, and restarted when one dies (at most `--max_restarts` times).
//!
//! Each process's exit is news the schedule needs at once: a killed worker sends no QUIC
//! close, so its connection would only time out (60 s). Each keeps its standard input open
//! to us (`worker --exit-with-stdin`), so none outlives this process however it ends.

use super::launch;
use super::server::ShellEvent;
use anyhow::Result;
use std::collections::HashMap;
use tokio::process::ChildStdin;
use tokio::sync::{mpsc::UnboundedSender, oneshot};

/// The local workers.
pub struct Fleet {
    world: usize,
    join: String,
    device: String,
    events: UnboundedSender<ShellEvent>,
    restarts_left: usize,
    /// Restarts per slot, for the names (`local-1`, `local-1-r1`, ...).
    restarts: Vec<usize>,
    /// Running processes by name: how to kill each.
    kill: HashMap<String, oneshot::Sender<()>>,
    /// Their standard inputs, held open.
    lifelines: Vec<ChildStdin>,
}

impl Fleet {
    /// Starts `world` workers joining `join`.
    pub fn start(
        world: usize,
        join: String,
        device: String,
        max_restarts: usize,
        events: UnboundedSender<ShellEvent>,
    ) -> Result<Self> {
        let mut fleet = Self {
            world,
            join,
            device,
            events,
            restarts_left: max_restarts,
            restarts: vec![0; world],
            kill: HashMap::new(),
            lifelines: Vec::new(),
        };
        for slot in 0..world {
            fleet.spawn(slot)?;
        }
        Ok(fleet)
    }

    fn spawn(&mut self, slot: usize) -> Result<String> {
        let name = match self.restarts[slot] {
            0 => format!("local-{slot}"),
            k => format!("local-{slot}-r{k}"),
        };
        let mut child = launch::spawn(slot, self.world, &name, &self.join, &self.device)?;
        self.lifelines.extend(child.stdin.take());
        let (kill, mut killed) = oneshot::channel();
        self.kill.insert(name.clone(), kill);
        let (events, watched) = (self.events.clone(), name.clone());
        tokio::spawn(async move {
            let status = tokio::select! {
                status = child.wait() => status,
                Ok(()) = &mut killed => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
            let _ = events.send(ShellEvent::Exited(slot, watched, status));
        });
        Ok(name)
    }

    /// Kills the worker `name` if it is one of ours and still runs (the schedule fenced it:
    /// stopped or hung, it must not come back).
    pub fn kill(&mut self, name: &str) {
        if let Some(kill) = self.kill.remove(name) {
            let _ = kill.send(());
        }
    }

    /// Worker `name` of `slot` exited: start its replacement, if restarts are left. Returns
    /// the new name, or `None` when they are used up.
    pub fn exited(&mut self, slot: usize, name: &str) -> Result<Option<String>> {
        self.kill.remove(name);
        if self.restarts_left == 0 {
            return Ok(None);
        }
        self.restarts_left -= 1;
        self.restarts[slot] += 1;
        self.spawn(slot).map(Some)
    }
}

//! The QUIC side of the coordinator: accepts connections, authenticates workers, and turns
//! each worker's stream into schedule events (and commands back into frames).
//!
//! A peer that fails the TLS handshake (wrong fingerprint pinned, not our ALPN), does not
//! prove the token, speaks another protocol version, or sends an oversized or malformed
//! frame is closed with a logged reason; it never reaches the schedule before it proved the
//! token, so it gets no data, and nothing it sends can stop the run.

use crate::schedule::{Event, WorkerId};
use lorafleet_common::protocol::{verify_join_proof, ToCoordinator, ToWorker, MAX_FRAME, MAX_HANDSHAKE_FRAME};
use lorafleet_worker::link::{self, LinkError, CLOSE_REFUSED};
use quinn::{Connection, RecvStream, SendStream};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};

/// How long a new connection has to prove the token.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the connection tasks tell the driver.
pub enum ShellEvent {
    /// A worker authenticated: where to send its commands.
    Attached(WorkerId, UnboundedSender<Outgoing>),
    /// An event for the schedule.
    Schedule(Event),
    /// A local worker process exited (slot, name, exit status).
    Exited(usize, String, String),
}

/// What the driver asks a connection task to do.
pub enum Outgoing {
    /// Send a message.
    Message(ToWorker),
    /// Close the connection.
    Close(String),
}

/// The run's secrets.
pub struct Secrets {
    pub token: String,
    pub fingerprint: String,
}

/// Accepts connections until the endpoint closes.
pub async fn accept(endpoint: quinn::Endpoint, secrets: Arc<Secrets>, events: UnboundedSender<ShellEvent>) {
    let mut next_id: WorkerId = 0;
    while let Some(incoming) = endpoint.accept().await {
        let id = next_id;
        next_id += 1;
        tokio::spawn(serve(incoming, id, secrets.clone(), events.clone()));
    }
}

async fn serve(incoming: quinn::Incoming, id: WorkerId, secrets: Arc<Secrets>, events: UnboundedSender<ShellEvent>) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(c) => c,
        Err(e) => {
            // Wrong pinned fingerprint, wrong ALPN, not QUIC at all.
            tracing::warn!("refused {remote}: QUIC/TLS handshake failed: {e}");
            return;
        }
    };
    let (send, mut recv, name) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&conn, &secrets)).await {
        Ok(Ok(joined)) => joined,
        Ok(Err(reason)) => return refuse(&conn, remote, &reason),
        Err(_) => return refuse(&conn, remote, "did not prove the join token within 10 s"),
    };
    tracing::info!("worker {name} ({remote}) authenticated");
    let (tx, rx) = unbounded_channel();
    if events.send(ShellEvent::Attached(id, tx)).is_err()
        || events.send(ShellEvent::Schedule(Event::Joined { id, name: name.clone() })).is_err()
    {
        return;
    }
    tokio::spawn(write_loop(conn.clone(), send, rx));
    let reason = loop {
        match link::read_frame::<ToCoordinator>(&mut recv, MAX_FRAME).await {
            Ok(msg) => {
                if events.send(ShellEvent::Schedule(Event::Message { id, msg })).is_err() {
                    return;
                }
            }
            Err(LinkError::Frame(e)) => {
                let reason = format!("{e}");
                refuse(&conn, remote, &reason);
                break reason;
            }
            Err(e) => break e.to_string(),
        }
    };
    let _ = events.send(ShellEvent::Schedule(Event::Lost { id, reason }));
}

fn refuse(conn: &Connection, remote: SocketAddr, reason: &str) {
    tracing::warn!("refused {remote}: {reason}");
    conn.close(CLOSE_REFUSED.into(), reason.as_bytes());
}

/// Hello, challenge, proof. Frames are capped at [`MAX_HANDSHAKE_FRAME`] until the proof.
async fn handshake(conn: &Connection, secrets: &Secrets) -> Result<(SendStream, RecvStream, String), String> {
    let (mut send, mut recv) = conn.accept_bi().await.map_err(|e| format!("no control stream: {e}"))?;
    let name = match link::read_frame(&mut recv, MAX_HANDSHAKE_FRAME).await.map_err(|e| e.to_string())? {
        ToCoordinator::Hello { name } => name.chars().filter(|c| !c.is_control()).take(64).collect::<String>(),
        _ => return Err("the first message was not Hello".into()),
    };
    let nonce: [u8; 32] = rand::random();
    link::write_frame(&mut send, &ToWorker::Challenge { nonce }).await.map_err(|e| e.to_string())?;
    match link::read_frame(&mut recv, MAX_HANDSHAKE_FRAME).await.map_err(|e| e.to_string())? {
        ToCoordinator::Proof { mac } if verify_join_proof(&secrets.token, &nonce, &secrets.fingerprint, &mac) => {
            Ok((send, recv, name))
        }
        ToCoordinator::Proof { .. } => Err(format!("worker {name:?}: wrong join token")),
        _ => Err(format!("worker {name:?}: expected the token proof")),
    }
}

async fn write_loop(conn: Connection, mut send: SendStream, mut rx: tokio::sync::mpsc::UnboundedReceiver<Outgoing>) {
    while let Some(out) = rx.recv().await {
        match out {
            Outgoing::Message(msg) => {
                let last = matches!(msg, ToWorker::Shutdown { .. });
                if link::write_frame(&mut send, &msg).await.is_err() {
                    return;
                }
                if last {
                    let _ = send.finish();
                    return;
                }
            }
            Outgoing::Close(reason) => {
                conn.close(CLOSE_REFUSED.into(), reason.as_bytes());
                return;
            }
        }
    }
}

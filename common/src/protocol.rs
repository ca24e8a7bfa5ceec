//! The coordinator–worker control protocol: typed messages and their frames, sans-IO.
//!
//! A frame is `len: u32 LE | version: u16 LE | bincode(message)` where `len` counts the
//! version and the body. The reader checks the length against a limit *before* buffering
//! anything, then the version, then decodes: a stranger can make us read at most
//! [`MAX_HANDSHAKE_FRAME`] bytes, and nothing a peer sends can make us panic.
//!
//! The join token never crosses the wire: the coordinator sends a fresh nonce and the worker
//! answers with HMAC-SHA256(token, nonce ‖ certificate fingerprint), which binds the proof to
//! this coordinator's certificate (a relaying man-in-the-middle has another fingerprint).

use crate::batch::Batch;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Bumped on any change to the messages below; peers with another version are refused.
pub const PROTOCOL_VERSION: u16 = 2;
/// Largest frame accepted before a peer has authenticated.
pub const MAX_HANDSHAKE_FRAME: usize = 4 * 1024;
/// Largest frame accepted from an authenticated peer (the most a u32 length can say): an
/// adapter with its AdamW moments, e.g. a 13B all-linear r=64 adapter (~3 GB).
pub const MAX_FRAME: usize = u32::MAX as usize;
/// Bytes before the body: length and version.
pub const HEADER_LEN: usize = 6;

/// A SHA-256 digest.
pub type Hash = [u8; 32];

/// Why a frame was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// The announced length is over the limit for this stage of the connection.
    #[error("frame of {len} bytes is over the {limit}-byte limit")]
    TooLarge {
        /// Announced length.
        len: usize,
        /// Limit in force.
        limit: usize,
    },
    /// The peer speaks another protocol version.
    #[error("protocol version {got} (this build speaks {PROTOCOL_VERSION})")]
    Version {
        /// The peer's version.
        got: u16,
    },
    /// The body does not decode as a message.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Messages from a worker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ToCoordinator {
    /// First frame: who is asking to join.
    Hello {
        /// A human-readable name (host-pid by default).
        name: String,
    },
    /// Answer to [`ToWorker::Challenge`], see [`join_proof`].
    Proof {
        /// The HMAC.
        mac: Hash,
    },
    /// What the worker loaded, sent once after [`ToWorker::Welcome`].
    Identity(Identity),
    /// The collective is connected; the worker waits for work.
    Ready,
    /// Sent every second from a worker's network task, whatever its compute thread does.
    Heartbeat(Resources),
    /// A finished optimizer step.
    StepDone(StepReport),
    /// Summed eval loss over the worker's shard.
    EvalDone {
        /// Sum of token losses.
        loss_sum: f64,
        /// Target tokens.
        tokens: u64,
    },
    /// Exact-match count over the worker's shard.
    ExactMatchDone {
        /// Answers that matched.
        correct: u64,
        /// Answers generated.
        total: u64,
    },
    /// Digest of the worker's LoRA weights and optimizer state after `step`.
    Digest {
        /// The step.
        step: u64,
        /// SHA-256 over the weights and state.
        digest: Hash,
    },
    /// The trainable state, as safetensors files.
    State {
        /// The adapter's tensors under their PEFT keys.
        adapter: Vec<u8>,
        /// The optimizer state as written to `optimizer.safetensors`.
        optimizer: Vec<u8>,
    },
    /// The state of [`ToWorker::Restore`] is in place.
    Restored {
        /// The step it is after.
        step: u64,
        /// Its digest, as [`ToCoordinator::Digest`] would report it.
        digest: Hash,
    },
    /// The worker hit an error and stops; the run stops with it.
    Failed {
        /// What happened.
        message: String,
        /// The error is a NaN or infinite loss or gradient.
        nonfinite: bool,
    },
}

/// Messages from the coordinator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ToWorker {
    /// Prove the token over this nonce.
    Challenge {
        /// Fresh random bytes.
        nonce: Hash,
    },
    /// Accepted: the worker's place and the run's configuration.
    Welcome {
        /// This worker's rank.
        rank: u32,
        /// Number of ranks.
        world: u32,
        /// The run's identity (a label in metrics).
        run_id: String,
        /// The resolved training configuration, as TOML.
        config_toml: String,
    },
    /// Everyone is in: how to reach the other ranks.
    Peers(Peers),
    /// Run one optimizer step on these micro-batches.
    Step {
        /// The run's generation (bumped at every recovery), echoed in the report so that a
        /// step of an abandoned generation is never counted.
        generation: u64,
        /// 1-based step.
        step: u64,
        /// Learning rate for this step.
        lr: f64,
        /// This rank's micro-batches (as many as every other rank's; some may be empty).
        micro_batches: Vec<Batch>,
    },
    /// Sum the eval loss over these batches.
    Eval {
        /// The shard's batches.
        batches: Vec<Batch>,
    },
    /// Generate greedily and count exact matches.
    ExactMatch {
        /// With the adapter being trained (else the base model).
        with_adapter: bool,
        /// (prompt, expected answer) pairs.
        pairs: Vec<(String, String)>,
        /// Generation budget.
        max_new_tokens: u32,
    },
    /// Report the state digest.
    Verify {
        /// The step the digest is for.
        step: u64,
    },
    /// Send the trainable state.
    Fetch,
    /// A rank was lost: abandon any collective in progress, take this rank in the re-formed
    /// group and announce a new ring address (an [`ToCoordinator::Identity`]).
    Regroup {
        /// This worker's new rank.
        rank: u32,
        /// Ranks.
        world: u32,
        /// The new generation.
        generation: u64,
    },
    /// Replace the trainable state with a checkpoint's (a resumed or recovered run; step 0 and
    /// no bytes: the run's initial state), then report its digest.
    Restore {
        /// The step the state is after.
        step: u64,
        /// The adapter's `adapter_model.safetensors` bytes.
        adapter: Vec<u8>,
        /// The optimizer's `optimizer.safetensors` bytes.
        optimizer: Vec<u8>,
    },
    /// The run is over (or aborted); exit.
    Shutdown {
        /// Why.
        reason: String,
    },
}

/// What a worker loaded: the coordinator refuses workers whose files differ from its own.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    /// Digest of the model's config.json and its weight files' headers and sizes.
    pub model: Hash,
    /// Digest of the tokenizer files.
    pub tokenizer: Hash,
    /// The device the worker computes on, for logs.
    pub device: String,
    /// Where this worker's ring collective listens (`ip:port`).
    pub ring_addr: String,
    /// An NCCL unique id, created by rank 0 of a GPU group.
    pub nccl_id: Option<Vec<u8>>,
}

/// How ranks reach each other.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Peers {
    /// Ring addresses in rank order.
    pub ring: Vec<String>,
    /// A per-run secret that ring connections present, so a stray connection is refused.
    pub ring_key: Hash,
    /// Rank 0's NCCL id, when the group uses NCCL.
    pub nccl_id: Option<Vec<u8>>,
}

/// A worker's resource use.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Resources {
    /// Resident set size of the worker process.
    pub rss_bytes: u64,
    /// Device memory in use (0 on CPU).
    pub device_used_bytes: u64,
    /// Peak device memory in use (0 on CPU).
    pub device_peak_bytes: u64,
    /// The device's memory (0 on CPU).
    pub device_total_bytes: u64,
}

/// Seconds spent in each phase of a step on one rank.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PhaseSeconds {
    /// Building tensors from the batches.
    pub data: f64,
    /// Forward passes.
    pub forward: f64,
    /// Backward passes (recomputation included).
    pub backward: f64,
    /// Gradient and statistics all-reduce, waiting for the slowest rank included.
    pub allreduce: f64,
    /// Clipping and the AdamW update.
    pub optimizer: f64,
}

/// One rank's account of a finished step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepReport {
    /// The generation of the step command.
    pub generation: u64,
    /// The step.
    pub step: u64,
    /// Global mean token loss (identical on every rank).
    pub loss: f64,
    /// Global target tokens.
    pub tokens: u64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Non-padding tokens this rank processed.
    pub local_tokens: u64,
    /// Rows this rank processed.
    pub local_samples: u64,
    /// Where the time went.
    pub seconds: PhaseSeconds,
}

/// Encodes `msg` as one frame.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let body = bincode::serde::encode_to_vec(msg, bincode::config::standard())
        .expect("in-memory serialization of plain data cannot fail");
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&((body.len() + 2) as u32).to_le_bytes());
    out.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Reads the length from a frame's first four bytes and checks it against `limit`;
/// returns how many bytes follow (version and body).
pub fn frame_len(header: [u8; 4], limit: usize) -> Result<usize, FrameError> {
    let len = u32::from_le_bytes(header) as usize;
    if len > limit || len < 2 {
        return Err(FrameError::TooLarge { len, limit });
    }
    Ok(len)
}

/// Decodes what follows the length: version and body.
pub fn decode<T: for<'de> Deserialize<'de>>(rest: &[u8]) -> Result<T, FrameError> {
    let (version, body) = rest.split_at_checked(2).ok_or_else(|| FrameError::Malformed("empty frame".into()))?;
    let got = u16::from_le_bytes([version[0], version[1]]);
    if got != PROTOCOL_VERSION {
        return Err(FrameError::Version { got });
    }
    let config = bincode::config::standard().with_limit::<MAX_FRAME>();
    let (msg, used) =
        bincode::serde::decode_from_slice(body, config).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if used != body.len() {
        return Err(FrameError::Malformed(format!("{} trailing bytes", body.len() - used)));
    }
    Ok(msg)
}

/// The worker's answer to a challenge: HMAC-SHA256 keyed by the token over the nonce and
/// the coordinator certificate's fingerprint.
pub fn join_proof(token: &str, nonce: &Hash, fingerprint: &str) -> Hash {
    proof_mac(token, nonce, fingerprint).finalize().into_bytes().into()
}

/// Checks a proof in constant time.
pub fn verify_join_proof(token: &str, nonce: &Hash, fingerprint: &str, mac: &Hash) -> bool {
    proof_mac(token, nonce, fingerprint).verify_slice(mac).is_ok()
}

fn proof_mac(token: &str, nonce: &Hash, fingerprint: &str) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(token.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(b"lorafleet-join-v1\0");
    mac.update(nonce);
    mac.update(fingerprint.to_ascii_lowercase().as_bytes());
    mac
}

/// The first `max_chars` characters of a message's debug form: enough to name it in an error
/// without pasting a batch of token ids into the log.
pub fn brief(msg: &impl std::fmt::Debug, max_chars: usize) -> String {
    format!("{msg:?}").chars().take(max_chars).collect()
}

/// SHA-256 of `bytes` as lowercase hex: the form fingerprints are printed and pinned in.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(msg: &ToWorker) -> Result<ToWorker, FrameError> {
        let frame = encode(msg);
        let len = frame_len(frame[..4].try_into().unwrap(), MAX_FRAME)?;
        assert_eq!(len, frame.len() - 4);
        decode(&frame[4..])
    }

    #[test]
    fn messages_round_trip() {
        let batch = Batch::from_rows(&[(vec![1, 2, 3], vec![-100, 2, 3])], vec![7], 0, 1);
        let msg = ToWorker::Step { generation: 2, step: 3, lr: 1e-4, micro_batches: vec![batch] };
        assert_eq!(roundtrip(&msg).unwrap(), msg);
    }

    #[test]
    fn oversized_frames_are_refused_before_reading() {
        let frame = encode(&ToCoordinator::Hello { name: "x".repeat(10_000) });
        let err = frame_len(frame[..4].try_into().unwrap(), MAX_HANDSHAKE_FRAME).unwrap_err();
        assert!(matches!(err, FrameError::TooLarge { limit: MAX_HANDSHAKE_FRAME, .. }), "{err}");
    }

    #[test]
    fn other_versions_and_garbage_are_refused() {
        let mut frame = encode(&ToCoordinator::Ready);
        frame[4] = 9;
        assert_eq!(decode::<ToCoordinator>(&frame[4..]), Err(FrameError::Version { got: 9 }));
        let [v0, v1] = PROTOCOL_VERSION.to_le_bytes();
        let garbage = [v0, v1, 0xff, 0xff, 0xff, 0xff, 0xff, 0x13];
        assert!(matches!(decode::<ToCoordinator>(&garbage), Err(FrameError::Malformed(_))));
        assert!(matches!(decode::<ToCoordinator>(&[1]), Err(FrameError::Malformed(_))));
        // A length claiming a huge vector must not allocate it.
        let mut huge = vec![v0, v1, 5];
        huge.extend_from_slice(&[0xfc, 0xff, 0xff, 0xff, 0xff]);
        assert!(decode::<ToCoordinator>(&huge).is_err());
    }

    #[test]
    fn proofs_bind_token_nonce_and_fingerprint() {
        let nonce = [7u8; 32];
        let mac = join_proof("secret", &nonce, "AB12");
        assert!(verify_join_proof("secret", &nonce, "ab12", &mac));
        assert!(!verify_join_proof("secret2", &nonce, "ab12", &mac));
        assert!(!verify_join_proof("secret", &[8u8; 32], "ab12", &mac));
        assert!(!verify_join_proof("secret", &nonce, "ab13", &mac));
    }
}

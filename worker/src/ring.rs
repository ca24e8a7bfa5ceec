//! The CPU collective: a ring all-reduce over TCP between worker processes.
//!
//! Reduce-scatter then all-gather (each rank sends and receives `2·(n−1)/n` of the buffer,
//! whatever n). Chunk `c` is summed in ring order starting at rank `c`, the same order at
//! every step, and the all-gather copies the finished sums, so every rank ends with the
//! same bits and two runs add the same numbers in the same order.

use crate::collective::Collective;
use crate::error::{Error, Result};
use candle_core::Tensor;
use lorafleet_common::protocol::Hash;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Elements reduced per round trip of the ring: bounds the copy buffers, not the maths.
const BUCKET_ELEMS: usize = 4 << 20;
/// How long ranks wait for each other to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// A rank's two links: to the next rank and from the previous one.
pub struct Ring {
    rank: usize,
    world: usize,
    links: Option<(TcpStream, TcpStream)>,
}

/// Breaks a ring's links from another thread: a rank blocked in an all-reduce whose peer is
/// gone or stopped (SIGSTOP keeps its sockets open) gets an error instead of waiting forever.
/// The worker's network side holds one and trips it when the coordinator regroups the ranks.
#[derive(Clone, Default)]
pub struct RingAbort(Arc<Mutex<Vec<TcpStream>>>);

impl RingAbort {
    /// Watches `ring`'s links from now on (instead of an earlier ring's).
    pub fn watch(&self, ring: &Ring) {
        let clones = ring.links.iter().flat_map(|(a, b)| [a.try_clone(), b.try_clone()]).flatten().collect();
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = clones;
    }

    /// Shuts the watched links down: reads and writes on them fail at once, here and at
    /// the peers.
    pub fn trip(&self) {
        for s in self.0.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Numbers the ring can carry.
trait Element: Copy + std::ops::AddAssign + Send + Sync {
    const SIZE: usize;
    fn write(self, out: &mut Vec<u8>);
    fn read(bytes: &[u8]) -> Self;
}

impl Element for f32 {
    const SIZE: usize = 4;
    fn write(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn read(bytes: &[u8]) -> Self {
        f32::from_le_bytes(bytes.try_into().expect("chunked by SIZE"))
    }
}

impl Element for f64 {
    const SIZE: usize = 8;
    fn write(self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.to_le_bytes());
    }
    fn read(bytes: &[u8]) -> Self {
        f64::from_le_bytes(bytes.try_into().expect("chunked by SIZE"))
    }
}

fn net(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Collective(format!("ring: {what}: {e}"))
}

impl Ring {
    /// Binds the listener the previous rank will connect to; its address is announced to
    /// the coordinator before the ring forms.
    pub fn listen(ip: std::net::IpAddr) -> Result<TcpListener> {
        TcpListener::bind(SocketAddr::new(ip, 0)).map_err(|e| net("binding the listener", e))
    }

    /// Forms the ring: connects to rank+1 and accepts rank−1, both presenting `key`.
    pub fn connect(listener: TcpListener, rank: usize, world: usize, addrs: &[String], key: &Hash) -> Result<Self> {
        if world == 1 {
            return Ok(Self { rank, world, links: None });
        }
        if addrs.len() != world || rank >= world {
            return Err(Error::Collective(format!("ring: {} addresses for rank {rank} of {world}", addrs.len())));
        }
        let prev = (rank + world - 1) % world;
        let accept = std::thread::spawn({
            let key = *key;
            move || accept_prev(listener, prev as u32, &key)
        });
        let next = connect_next(&addrs[(rank + 1) % world], rank as u32, key)?;
        let prev = accept.join().map_err(|_| Error::Collective("ring: accept thread panicked".into()))??;
        Ok(Self { rank, world, links: Some((next, prev)) })
    }

    fn all_reduce<T: Element>(&mut self, data: &mut [T]) -> Result<()> {
        let (n, r) = (self.world, self.rank);
        let Some((next, prev)) = self.links.as_mut() else { return Ok(()) };
        for bucket in data.chunks_mut(BUCKET_ELEMS) {
            let len = bucket.len();
            let bounds = move |i: usize| (i * len / n, (i + 1) * len / n);
            // Reduce-scatter: after n−1 rounds rank r holds the full sum of chunk r+1.
            for s in 0..n - 1 {
                let (send, recv) = ((r + n - s) % n, (r + 2 * n - s - 1) % n);
                let (a, b) = bounds(send);
                let (c, d) = bounds(recv);
                let incoming = exchange(next, prev, &bucket[a..b], d - c)?;
                for (slot, v) in bucket[c..d].iter_mut().zip(incoming) {
                    *slot += v;
                }
            }
            // All-gather: pass the finished chunks around.
            for s in 0..n - 1 {
                let (send, recv) = ((r + 1 + n - s) % n, (r + n - s) % n);
                let (a, b) = bounds(send);
                let (c, d) = bounds(recv);
                let incoming = exchange(next, prev, &bucket[a..b], d - c)?;
                bucket[c..d].copy_from_slice(&incoming);
            }
        }
        Ok(())
    }
}

/// Sends `out` to the next rank while receiving `len` elements from the previous one (both
/// at once: with every rank sending first, full socket buffers would deadlock the ring).
fn exchange<T: Element>(next: &mut TcpStream, prev: &mut TcpStream, out: &[T], len: usize) -> Result<Vec<T>> {
    let mut bytes = Vec::with_capacity(out.len() * T::SIZE);
    out.iter().for_each(|v| v.write(&mut bytes));
    let mut incoming = vec![0u8; len * T::SIZE];
    std::thread::scope(|scope| {
        let sender = scope.spawn(|| next.write_all(&bytes));
        let received = prev.read_exact(&mut incoming);
        let sent = sender.join().map_err(|_| Error::Collective("ring: sender thread panicked".into()))?;
        sent.map_err(|e| net("sending to the next rank", e))?;
        received.map_err(|e| net("receiving from the previous rank", e))
    })?;
    Ok(incoming.chunks_exact(T::SIZE).map(T::read).collect())
}

fn connect_next(addr: &str, rank: u32, key: &Hash) -> Result<TcpStream> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let mut stream = loop {
        match TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => return Err(net(&format!("connecting to {addr}"), e)),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    stream.set_nodelay(true).map_err(|e| net("TCP_NODELAY", e))?;
    stream.write_all(key).and_then(|_| stream.write_all(&rank.to_le_bytes())).map_err(|e| net("greeting", e))?;
    Ok(stream)
}

/// Accepts connections until one presents the run's key and the expected rank; others are
/// dropped (a port scanner or a stale worker cannot take the slot).
fn accept_prev(listener: TcpListener, expected: u32, key: &Hash) -> Result<TcpStream> {
    listener.set_nonblocking(true).map_err(|e| net("listener", e))?;
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        match listener.accept() {
            Ok((mut stream, from)) => {
                stream.set_nonblocking(false).map_err(|e| net("socket", e))?;
                stream.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| net("socket", e))?;
                let mut greeting = [0u8; 36];
                let ok = stream.read_exact(&mut greeting).is_ok()
                    && greeting[..32] == key[..]
                    && greeting[32..] == expected.to_le_bytes();
                if ok {
                    stream.set_read_timeout(None).map_err(|e| net("socket", e))?;
                    stream.set_nodelay(true).map_err(|e| net("TCP_NODELAY", e))?;
                    return Ok(stream);
                }
                tracing::warn!("ring: refused a connection from {from}: wrong key or rank");
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return Err(Error::Collective(format!("ring: rank {expected} did not connect within 60 s")));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(net("accepting", e)),
        }
    }
}

impl Collective for Ring {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_grads(&mut self, bucket: Tensor) -> Result<Tensor> {
        if self.world == 1 {
            return Ok(bucket);
        }
        let device = bucket.device().clone();
        let mut data = bucket.to_vec1::<f32>()?;
        self.all_reduce(&mut data)?;
        let n = data.len();
        Ok(Tensor::from_vec(data, n, &device)?)
    }

    fn all_reduce_stats(&mut self, stats: &mut [f64]) -> Result<()> {
        self.all_reduce(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring_of(world: usize) -> Vec<Ring> {
        let key = [3u8; 32];
        let listeners: Vec<_> = (0..world).map(|_| Ring::listen([127, 0, 0, 1].into()).unwrap()).collect();
        let addrs: Vec<String> = listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(r, l)| {
                let addrs = addrs.clone();
                std::thread::spawn(move || Ring::connect(l, r, world, &addrs, &key).unwrap())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn every_rank_gets_the_same_sum() {
        for world in [1, 2, 3, 4] {
            // Lengths shorter than, equal to and not divisible by the world size.
            for len in [1usize, 3, 4, 1001] {
                let rings = ring_of(world);
                let handles: Vec<_> = rings
                    .into_iter()
                    .enumerate()
                    .map(|(r, mut ring)| {
                        std::thread::spawn(move || {
                            let mut v: Vec<f64> = (0..len).map(|i| (i * 10 + r) as f64 + 0.1).collect();
                            ring.all_reduce(&mut v).unwrap();
                            v
                        })
                    })
                    .collect();
                let results: Vec<Vec<f64>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
                let expected: Vec<f64> =
                    (0..len).map(|i| (0..world).map(|r| (i * 10 + r) as f64 + 0.1).sum::<f64>()).collect::<Vec<_>>();
                for got in &results {
                    assert_eq!(got, &results[0], "ranks disagree (world {world}, len {len})");
                    for (g, e) in got.iter().zip(&expected) {
                        assert!((g - e).abs() < 1e-9, "world {world} len {len}: {g} vs {e}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_tripped_abort_ends_an_all_reduce_whose_peer_never_comes() {
        let mut rings = ring_of(2);
        let abort = RingAbort::default();
        abort.watch(&rings[0]);
        let _silent = rings.pop();
        let mut ring = rings.pop().unwrap();
        let blocked = std::thread::spawn(move || ring.all_reduce(&mut [1.0f64; 8]));
        std::thread::sleep(Duration::from_millis(100));
        abort.trip();
        let err = blocked.join().unwrap().unwrap_err().to_string();
        assert!(err.contains("ring"), "{err}");
    }

    #[test]
    fn a_stray_connection_does_not_take_a_slot() {
        let key = [9u8; 32];
        let listener = Ring::listen([127, 0, 0, 1].into()).unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = std::thread::spawn(move || accept_prev(listener, 1, &key));
        let mut stray = TcpStream::connect(addr).unwrap();
        stray.write_all(&[0u8; 36]).unwrap();
        let good = connect_next(&addr.to_string(), 1, &key).unwrap();
        let got = accept.join().unwrap().unwrap();
        assert_eq!(got.peer_addr().unwrap(), good.local_addr().unwrap());
    }
}

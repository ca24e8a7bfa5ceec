//! The seam between one rank's step and the others': a sum over ranks.
//!
//! Every rank calls the same collectives in the same order with buffers of the same layout
//! (the adapter's `named_vars` order); a rank that skipped one would hang the others.

use crate::error::Result;
use candle_core::Tensor;

/// A sum-all-reduce across the ranks of a data-parallel group.
pub trait Collective: Send {
    /// This process's rank, `0..world_size`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world_size(&self) -> usize;
    /// Sums the flat f32 gradient bucket over ranks; every rank receives the same result.
    fn all_reduce_grads(&mut self, bucket: Tensor) -> Result<Tensor>;
    /// Sums small f64 statistics (loss sum, token count) over ranks, in place.
    fn all_reduce_stats(&mut self, stats: &mut [f64]) -> Result<()>;
}

/// The collective of a group of one: every reduction is the identity.
#[derive(Debug, Default)]
pub struct SingleRank;

impl Collective for SingleRank {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_grads(&mut self, bucket: Tensor) -> Result<Tensor> {
        Ok(bucket)
    }

    fn all_reduce_stats(&mut self, _stats: &mut [f64]) -> Result<()> {
        Ok(())
    }
}

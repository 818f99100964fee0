//! Federated averaging over (sparse, partial) updates, as a running
//! weighted sum: memory is one sum per tensor, whatever the number of
//! sites; chunks are added as they are read from disk.
//!
//! new = global + Σᵢ nᵢ Δᵢ / Σᵢ nᵢ per tensor, where the sums run over the
//! sites whose update carries that tensor (a tensor a site excluded, as
//! FedBN's batch-norm statistics, is averaged over the others, and stays
//! the global's when no site sent it).

use super::FederationError;
use super::shards::Chunk;
use super::tensors::Tensors;

/// The running sum of one round.
#[derive(Debug)]
pub struct RunningAverage {
    _private: (),
}

impl RunningAverage {
    /// An empty sum over tensors shaped as `global`'s.
    pub fn new(global: &Tensors) -> Self {
        let _ = global;
        todo!("federation maths")
    }

    /// Starts one site's update of `samples` cases carrying `tensors`
    /// (names): each counts that site's weight once.
    ///
    /// # Errors
    /// [`FederationError::Mismatch`] for a tensor the global model lacks.
    pub fn begin_update(
        &mut self,
        tensors: &[String],
        samples: u64,
    ) -> Result<(), FederationError> {
        let _ = (tensors, samples);
        todo!("federation maths")
    }

    /// Adds one chunk of the current update, weighted by its samples.
    ///
    /// # Errors
    /// [`FederationError::Mismatch`] for a chunk outside its tensor or a
    /// tensor not declared by [`RunningAverage::begin_update`].
    pub fn add(&mut self, chunk: &Chunk) -> Result<(), FederationError> {
        let _ = chunk;
        todo!("federation maths")
    }

    /// The new global weights: `global` plus the weighted mean Δ.
    ///
    /// # Errors
    /// [`FederationError::Mismatch`] when `global` is not the one the sum
    /// was built for.
    pub fn finish(self, global: Tensors) -> Result<Tensors, FederationError> {
        let _ = global;
        todo!("federation maths")
    }
}

//! Dynamic batching: concurrent requests' prepared cases meet on one
//! inference thread, which runs up to `server.batch_max` of them in one
//! forward pass. When the model is free, a batch takes whatever is queued
//! (and waits up to `server.batch_max_wait_ms` for more, if configured);
//! while it is busy, new cases queue and form the next batch. With
//! `batch_max = 1` every case runs alone, in arrival order.

use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::metrics::Metrics;
use crate::model::{Model, ModelError, ModelInput, Prediction};
use crate::pipeline::Pipeline;

/// What one case gets back from its batch.
#[derive(Debug, Clone, Copy)]
pub struct BatchOutput {
    /// The prediction.
    pub prediction: Prediction,
    /// Time the case waited for the model, ms.
    pub queue_ms: f64,
    /// The forward pass, ms (shared by the batch).
    pub inference_ms: f64,
    /// Cases in the forward pass.
    pub batch_size: usize,
}

/// Why a case got no prediction.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// The model failed on this case.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The inference thread is gone (the server is shutting down).
    #[error("the inference thread has stopped")]
    Stopped,
}

struct Job {
    input: ModelInput,
    queued: Instant,
    reply: oneshot::Sender<Result<BatchOutput, BatchError>>,
}

/// The handle requests use to reach the inference thread.
#[derive(Debug, Clone)]
pub struct Batcher {
    jobs: Sender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").finish_non_exhaustive()
    }
}

impl Batcher {
    /// Starts the inference thread for `pipeline`'s model. It stops when the
    /// last handle is dropped.
    ///
    /// # Errors
    /// If the thread cannot be spawned.
    pub fn start(
        pipeline: Arc<Pipeline>,
        max_batch: usize,
        max_wait: Duration,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel();
        std::thread::Builder::new()
            .name("oxbox-inference".to_owned())
            .spawn(move || {
                run(
                    &queue,
                    pipeline.model(),
                    max_batch.max(1),
                    max_wait,
                    &metrics,
                )
            })?;
        Ok(Self { jobs })
    }

    /// Runs one case through the model, batched with whatever else is
    /// waiting.
    ///
    /// # Errors
    /// [`BatchError`].
    pub async fn infer(&self, input: ModelInput) -> Result<BatchOutput, BatchError> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job {
                input,
                queued: Instant::now(),
                reply,
            })
            .map_err(|_| BatchError::Stopped)?;
        answer.await.map_err(|_| BatchError::Stopped)?
    }
}

fn run(
    queue: &Receiver<Job>,
    model: &Model,
    max_batch: usize,
    max_wait: Duration,
    metrics: &Metrics,
) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        if !max_wait.is_zero() {
            let deadline = Instant::now() + max_wait;
            while batch.len() < max_batch {
                let left = deadline.saturating_duration_since(Instant::now());
                match queue.recv_timeout(left) {
                    Ok(job) => batch.push(job),
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                }
            }
        }
        run_batch(model, batch, metrics);
    }
}

fn run_batch(model: &Model, batch: Vec<Job>, metrics: &Metrics) {
    let started = Instant::now();
    let size = batch.len();
    let (inputs, waiting): (Vec<ModelInput>, Vec<_>) = batch
        .into_iter()
        .map(|job| (job.input, (job.queued, job.reply)))
        .unzip();
    let ms = |since: Instant| (since.elapsed().as_secs_f64() * 1e6).round() / 1e3;
    let queue_ms: Vec<f64> = waiting
        .iter()
        .map(|(queued, _)| (started.duration_since(*queued).as_secs_f64() * 1e6).round() / 1e3)
        .collect();
    match model.predict_batch(&inputs) {
        Ok(predictions) => {
            let inference_ms = ms(started);
            metrics.batch(size);
            for (((_, reply), prediction), queue_ms) in
                waiting.into_iter().zip(predictions).zip(queue_ms)
            {
                // A client that went away no longer listens; that is fine.
                let _ = reply.send(Ok(BatchOutput {
                    prediction,
                    queue_ms,
                    inference_ms,
                    batch_size: size,
                }));
            }
        }
        Err(_) if size > 1 => {
            // One case spoiled the batch: run each alone, so only it fails.
            for ((input, (_, reply)), queue_ms) in inputs.into_iter().zip(waiting).zip(queue_ms) {
                let t = Instant::now();
                let result = model
                    .predict_batch(std::slice::from_ref(&input))
                    .and_then(|mut p| {
                        p.pop()
                            .ok_or_else(|| ModelError::Input("empty batch".to_owned()))
                    })
                    .map(|prediction| BatchOutput {
                        prediction,
                        queue_ms,
                        inference_ms: ms(t),
                        batch_size: 1,
                    })
                    .map_err(BatchError::from);
                metrics.batch(1);
                let _ = reply.send(result);
            }
        }
        Err(e) => {
            if let Some((_, reply)) = waiting.into_iter().next() {
                let _ = reply.send(Err(e.into()));
            }
        }
    }
}

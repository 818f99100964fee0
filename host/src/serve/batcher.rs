//! Dynamic batching: concurrent requests' prepared cases meet on one
//! inference thread, which runs up to `server.batch_max` of them in one
//! forward pass. When the model is free, a batch takes whatever is queued
//! (and waits up to `server.batch_max_wait_ms` for more, if configured);
//! while it is busy, new cases queue and form the next batch. With
//! `batch_max = 1` every case runs alone, in arrival order.
//!
//! Batching pays only where a forward pass over several cases costs less
//! per case than one alone (a GPU; on a CPU whose kernels are already busy
//! at batch 1 it does not, and a larger batch only delays its first cases).
//! With `server.batch_calibrate` the inference thread first times the model
//! on a blank case at batch 1, 2, 4, … `batch_max` ([`calibrate`]) and
//! batches only up to the size that costs least per case (each step up
//! must save at least [`CALIBRATION_GAIN`]); it then serves.
//!
//! A panic in a forward pass is contained: the batch's cases are run again
//! one by one (so one poisoned case fails alone), a case whose forward pass
//! panics again gets [`BatchError::Panicked`] (500), and the thread keeps
//! serving. A forward pass that panics [`UNREADY_AFTER_PANICS`] times in a
//! row, with no successful pass in between (a model that fails on every
//! case), makes [`Batcher::unready`] say so, and readiness answer 503, until
//! a pass succeeds again. A panic anywhere else in the loop restarts the loop (the cases
//! of that batch get [`BatchError::Lost`]); after
//! [`MAX_RESTARTS`] restarts within [`RESTART_WINDOW`] the thread stops and
//! [`Batcher::stopped`] says why, which readiness reports as 503.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::metrics::Metrics;
use crate::model::{ModelError, ModelInput, Prediction};
use crate::pipeline::Pipeline;

/// Loop restarts after which the inference thread gives up.
pub const MAX_RESTARTS: usize = 5;

/// Forward passes panicking in a row (no success in between) after which
/// the batcher reports itself not ready.
pub const UNREADY_AFTER_PANICS: u64 = 3;

/// The window [`MAX_RESTARTS`] is counted in.
pub const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// The share of the cost per case a larger batch must save, against the
/// best smaller one, for [`calibrate`] to choose it.
pub const CALIBRATION_GAIN: f64 = 0.1;

/// Timed forward passes per batch size in [`calibrate`] (the fastest
/// counts, after one untimed pass).
pub const CALIBRATION_RUNS: usize = 2;

/// What [`calibrate`] measured and chose.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    /// (batch size, fastest forward pass per case in ms), by size.
    pub per_case_ms: Vec<(usize, f64)>,
    /// The largest batch the server will run.
    pub batch_limit: usize,
}

/// Times `forward` on copies of `blank` at batch 1, 2, 4, … and
/// `max_batch`, and chooses the batch limit: the smallest size whose cost
/// per case is not beaten by [`CALIBRATION_GAIN`] or more at a larger
/// size. A forward pass that fails stops the calibration at the sizes
/// measured so far (the failure is the serving path's to report).
pub fn calibrate(forward: &mut impl Forward, blank: &ModelInput, max_batch: usize) -> Calibration {
    let mut sizes: Vec<usize> = std::iter::successors(Some(1usize), |s| s.checked_mul(2))
        .take_while(|s| *s < max_batch)
        .collect();
    sizes.push(max_batch.max(1));
    let mut per_case_ms = Vec::new();
    for size in sizes {
        let inputs = vec![blank.clone(); size];
        let mut fastest = f64::INFINITY;
        for run in 0..=CALIBRATION_RUNS {
            let t = Instant::now();
            let ok = catch_unwind(AssertUnwindSafe(|| forward.forward(&inputs)))
                .is_ok_and(|r| r.is_ok());
            if !ok {
                fastest = f64::NAN;
                break;
            }
            if run > 0 {
                fastest = fastest.min(t.elapsed().as_secs_f64() * 1e3 / size as f64);
            }
        }
        if fastest.is_nan() {
            break;
        }
        per_case_ms.push((size, (fastest * 1e3).round() / 1e3));
    }
    let mut batch_limit = 1;
    let mut best = f64::INFINITY;
    for &(size, ms) in &per_case_ms {
        if ms <= best * (1.0 - CALIBRATION_GAIN) {
            best = ms;
            batch_limit = size;
        }
    }
    Calibration {
        per_case_ms,
        batch_limit,
    }
}

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
    /// The forward pass panicked on this case (a bug, not the input's
    /// fault); the inference thread carries on.
    #[error("the model's forward pass panicked: {0}")]
    Panicked(String),
    /// The case was dropped by an inference loop that panicked and was
    /// restarted.
    #[error("the inference loop failed while this case was queued")]
    Lost,
    /// The inference thread is gone (the server is shutting down, or the
    /// thread gave up after repeated panics).
    #[error("the inference thread has stopped")]
    Stopped,
}

/// The forward step a batch runs: one prediction per input, in order.
pub trait Forward: Send + 'static {
    /// Runs `inputs` through the model.
    ///
    /// # Errors
    /// [`ModelError`] for the whole batch.
    fn forward(&mut self, inputs: &[ModelInput]) -> Result<Vec<Prediction>, ModelError>;
}

impl<F> Forward for F
where
    F: FnMut(&[ModelInput]) -> Result<Vec<Prediction>, ModelError> + Send + 'static,
{
    fn forward(&mut self, inputs: &[ModelInput]) -> Result<Vec<Prediction>, ModelError> {
        self(inputs)
    }
}

struct Job {
    input: ModelInput,
    queued: Instant,
    reply: oneshot::Sender<Result<BatchOutput, BatchError>>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").finish_non_exhaustive()
    }
}

/// What the inference thread reports about itself.
#[derive(Debug, Default)]
struct Health {
    /// The thread is running (or has stopped because the server is
    /// shutting down).
    alive: AtomicBool,
    /// Forward passes that panicked.
    panics: AtomicU64,
    /// Forward passes that panicked since the last one that succeeded.
    consecutive_panics: AtomicU64,
    /// Loop restarts after a panic outside the forward pass.
    restarts: AtomicU64,
    /// Why the thread stopped, when it stopped on its own.
    stopped: Mutex<Option<String>>,
}

/// The handle requests use to reach the inference thread.
#[derive(Debug, Clone)]
pub struct Batcher {
    jobs: Sender<Job>,
    health: Arc<Health>,
}

impl Batcher {
    /// Starts the inference thread for `pipeline`'s model. It stops when the
    /// last handle is dropped.
    ///
    /// # Errors
    /// If the thread cannot be spawned.
    ///
    /// With `calibrate` (and `max_batch` > 1), the thread first times the
    /// model on a blank case ([`calibrate`]) and batches only as far as
    /// that pays; cases sent meanwhile queue.
    pub fn start(
        pipeline: Arc<Pipeline>,
        max_batch: usize,
        max_wait: Duration,
        calibrate: bool,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let blank = (calibrate && max_batch > 1).then(|| {
            let model = pipeline.model();
            let side = model.package().manifest.input_size as usize;
            ModelInput {
                image: model.uses_image().then(|| vec![0.0; side * side]),
                features: Vec::new(),
            }
        });
        let forward = move |inputs: &[ModelInput]| -> Result<Vec<Prediction>, ModelError> {
            pipeline.model().predict_batch(inputs)
        };
        Self::spawn(forward, blank, max_batch, max_wait, metrics)
    }

    /// Starts the inference thread around any forward step (the model's,
    /// or a test's).
    ///
    /// # Errors
    /// If the thread cannot be spawned.
    pub fn with_forward(
        forward: impl Forward,
        max_batch: usize,
        max_wait: Duration,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        Self::spawn(forward, None, max_batch, max_wait, metrics)
    }

    /// Starts the inference thread; with `blank`, it calibrates the batch
    /// limit on that case first.
    fn spawn(
        mut forward: impl Forward,
        blank: Option<ModelInput>,
        max_batch: usize,
        max_wait: Duration,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Self> {
        let (jobs, queue) = mpsc::channel();
        let health = Arc::new(Health::default());
        health.alive.store(true, Ordering::Release);
        let thread_health = Arc::clone(&health);
        std::thread::Builder::new()
            .name("oxbox-inference".to_owned())
            .spawn(move || {
                let mut max_batch = max_batch.max(1);
                if let Some(blank) = blank {
                    let calibration = calibrate(&mut forward, &blank, max_batch);
                    tracing::info!(
                        "batching: forward pass per case {} ms by batch size; batches of up to {} (server.batch_max = {max_batch})",
                        calibration
                            .per_case_ms
                            .iter()
                            .map(|(size, ms)| format!("{size}: {ms}"))
                            .collect::<Vec<_>>()
                            .join(", "),
                        calibration.batch_limit
                    );
                    max_batch = calibration.batch_limit;
                }
                metrics.batch_limit(max_batch);
                supervise(
                    &queue,
                    forward,
                    max_batch,
                    max_wait,
                    &metrics,
                    &thread_health,
                );
            })?;
        Ok(Self { jobs, health })
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
        answer.await.map_err(|_| BatchError::Lost)?
    }

    /// Why the inference thread stopped on its own, if it did; `None`
    /// while it serves.
    pub fn stopped(&self) -> Option<String> {
        if self.health.alive.load(Ordering::Acquire) {
            return None;
        }
        Some(
            match self.health.stopped.lock() {
                Ok(reason) => reason.clone(),
                Err(poisoned) => poisoned.into_inner().clone(),
            }
            .unwrap_or_else(|| "the inference thread has stopped".to_owned()),
        )
    }

    /// Why the batcher cannot serve predictions now, if it cannot: the
    /// thread stopped ([`Batcher::stopped`]), or the last
    /// [`UNREADY_AFTER_PANICS`] or more forward passes all panicked (until
    /// one succeeds). `None` when ready.
    pub fn unready(&self) -> Option<String> {
        if let Some(reason) = self.stopped() {
            return Some(reason);
        }
        let row = self.health.consecutive_panics.load(Ordering::Acquire);
        (row >= UNREADY_AFTER_PANICS).then(|| {
            format!(
                "the model's forward pass panicked on the last {row} attempts with no success in between (see the server log); ready again after a forward pass succeeds"
            )
        })
    }

    /// Forward passes that panicked, and loop restarts, so far.
    pub fn panics_and_restarts(&self) -> (u64, u64) {
        (
            self.health.panics.load(Ordering::Acquire),
            self.health.restarts.load(Ordering::Acquire),
        )
    }
}

/// Marks the thread as stopped however it ends.
struct AliveGuard<'a>(&'a Health);

impl Drop for AliveGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut reason = match self.0.stopped.lock() {
                Ok(reason) => reason,
                Err(poisoned) => poisoned.into_inner(),
            };
            reason.get_or_insert_with(|| "the inference thread panicked".to_owned());
        }
        self.0.alive.store(false, Ordering::Release);
    }
}

/// Runs the batching loop, restarting it after a panic outside the forward
/// pass, up to [`MAX_RESTARTS`] in [`RESTART_WINDOW`].
fn supervise(
    queue: &Receiver<Job>,
    mut forward: impl Forward,
    max_batch: usize,
    max_wait: Duration,
    metrics: &Metrics,
    health: &Health,
) {
    let _guard = AliveGuard(health);
    let mut restarts: Vec<Instant> = Vec::new();
    loop {
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            run(queue, &mut forward, max_batch, max_wait, metrics, health);
        }));
        let Err(payload) = outcome else {
            // Every handle is gone: the server is shutting down.
            return;
        };
        let message = panic_message(payload.as_ref());
        health.restarts.fetch_add(1, Ordering::AcqRel);
        metrics.inference_restart();
        let now = Instant::now();
        restarts.retain(|t| now.duration_since(*t) < RESTART_WINDOW);
        restarts.push(now);
        if restarts.len() > MAX_RESTARTS {
            let reason = format!(
                "the inference thread stopped after {} panics within {:?} (last: {message}); restart the server",
                restarts.len(),
                RESTART_WINDOW
            );
            tracing::error!("{reason}");
            match health.stopped.lock() {
                Ok(mut r) => *r = Some(reason),
                Err(poisoned) => *poisoned.into_inner() = Some(reason),
            }
            return;
        }
        tracing::error!("the inference loop panicked ({message}); restarting it");
    }
}

fn run(
    queue: &Receiver<Job>,
    forward: &mut impl Forward,
    max_batch: usize,
    max_wait: Duration,
    metrics: &Metrics,
    health: &Health,
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
        run_batch(forward, batch, metrics, health);
    }
}

/// Why a forward pass gave no predictions.
enum Failed {
    Model(ModelError),
    Panicked(String),
}

/// One forward pass, a panic turned into [`Failed::Panicked`].
fn guarded(
    forward: &mut impl Forward,
    inputs: &[ModelInput],
    metrics: &Metrics,
    health: &Health,
) -> Result<Vec<Prediction>, Failed> {
    match catch_unwind(AssertUnwindSafe(|| forward.forward(inputs))) {
        Ok(Ok(predictions)) if predictions.len() == inputs.len() => {
            health.consecutive_panics.store(0, Ordering::Release);
            Ok(predictions)
        }
        Ok(Ok(predictions)) => Err(Failed::Model(ModelError::Input(format!(
            "the model gave {} predictions for {} cases",
            predictions.len(),
            inputs.len()
        )))),
        Ok(Err(e)) => Err(Failed::Model(e)),
        Err(payload) => {
            let message = panic_message(payload.as_ref());
            health.panics.fetch_add(1, Ordering::AcqRel);
            health.consecutive_panics.fetch_add(1, Ordering::AcqRel);
            metrics.inference_panic();
            tracing::error!(
                "the model's forward pass panicked on a batch of {} ({message}); the inference thread carries on",
                inputs.len()
            );
            Err(Failed::Panicked(message))
        }
    }
}

fn run_batch(forward: &mut impl Forward, batch: Vec<Job>, metrics: &Metrics, health: &Health) {
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
    match guarded(forward, &inputs, metrics, health) {
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
                let result = match guarded(forward, std::slice::from_ref(&input), metrics, health) {
                    Ok(mut p) => p
                        .pop()
                        .ok_or_else(|| ModelError::Input("empty batch".to_owned()).into())
                        .map(|prediction| BatchOutput {
                            prediction,
                            queue_ms,
                            inference_ms: ms(t),
                            batch_size: 1,
                        }),
                    Err(Failed::Model(e)) => Err(BatchError::Model(e)),
                    Err(Failed::Panicked(m)) => Err(BatchError::Panicked(m)),
                };
                metrics.batch(1);
                let _ = reply.send(result);
            }
        }
        Err(failed) => {
            if let Some((_, reply)) = waiting.into_iter().next() {
                let _ = reply.send(Err(match failed {
                    Failed::Model(e) => BatchError::Model(e),
                    Failed::Panicked(m) => BatchError::Panicked(m),
                }));
            }
        }
    }
}

/// The text of a panic payload (`&str` or `String`), for logs.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::HorizonPrediction;

    fn prediction(value: f32) -> Prediction {
        let h = HorizonPrediction {
            p_o2_any: value,
            p_o2_high_flow_or_niv: value,
            p_ventilation_or_death: value,
            exam_score: value,
        };
        Prediction { h24: h, h72: h }
    }

    /// A case whose first feature carries `tag`.
    fn case(tag: f64) -> ModelInput {
        ModelInput {
            image: None,
            features: vec![("tag".to_owned(), Some(tag))],
        }
    }

    fn tag(input: &ModelInput) -> f64 {
        input.features[0].1.unwrap_or(f64::NAN)
    }

    /// A forward step that panics on every batch holding a case tagged 13
    /// (a bug the model could have) and answers each case's tag otherwise.
    fn forward_panicking_on_13(inputs: &[ModelInput]) -> Result<Vec<Prediction>, ModelError> {
        assert!(
            inputs.iter().all(|i| tag(i) != 13.0),
            "injected fault in the forward pass"
        );
        Ok(inputs.iter().map(|i| prediction(tag(i) as f32)).collect())
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// A forward step that takes `fixed + per_case × n` ms for n cases.
    fn timed_forward(
        fixed: u64,
        per_case: u64,
    ) -> impl FnMut(&[ModelInput]) -> Result<Vec<Prediction>, ModelError> {
        move |inputs: &[ModelInput]| {
            std::thread::sleep(Duration::from_millis(
                fixed + per_case * inputs.len() as u64,
            ));
            Ok(inputs.iter().map(|_| prediction(0.5)).collect())
        }
    }

    #[test]
    fn calibration_batches_only_as_far_as_it_saves_per_case() {
        // A fixed cost per pass (a GPU's launch, say): each doubling saves
        // per case, up to batch_max.
        let c = calibrate(&mut timed_forward(20, 1), &case(1.0), 8);
        assert_eq!(
            c.per_case_ms.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            [1, 2, 4, 8]
        );
        assert_eq!(c.batch_limit, 8, "{c:?}");
        // A cost per case only (a CPU busy at batch 1): no batching.
        let c = calibrate(&mut timed_forward(0, 10), &case(1.0), 8);
        assert_eq!(c.batch_limit, 1, "{c:?}");
        // batch_max that is no power of two is measured too.
        let c = calibrate(&mut timed_forward(20, 1), &case(1.0), 6);
        assert_eq!(
            c.per_case_ms.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            [1, 2, 4, 6]
        );
        assert_eq!(c.batch_limit, 6, "{c:?}");
        // A model that fails stops the calibration: no batching.
        let mut failing = |_: &[ModelInput]| -> Result<Vec<Prediction>, ModelError> {
            Err(ModelError::Input("broken".to_owned()))
        };
        let c = calibrate(&mut failing, &case(1.0), 8);
        assert_eq!(
            c,
            Calibration {
                per_case_ms: Vec::new(),
                batch_limit: 1
            }
        );
    }

    #[test]
    fn a_panicking_forward_pass_fails_its_case_and_the_thread_keeps_serving() {
        let forward = forward_panicking_on_13;
        let metrics = Arc::new(Metrics::new());
        let batcher =
            Batcher::with_forward(forward, 1, Duration::ZERO, Arc::clone(&metrics)).expect("start");
        let rt = runtime();
        let ok = rt.block_on(batcher.infer(case(1.0))).expect("healthy case");
        assert_eq!(ok.prediction.h24.p_o2_any, 1.0);
        let failed = rt.block_on(batcher.infer(case(13.0)));
        match failed {
            Err(BatchError::Panicked(m)) => assert!(m.contains("injected fault"), "{m}"),
            other => panic!("expected Panicked, got {other:?}"),
        }
        // The next case is served by the same thread; nothing stopped.
        let next = rt
            .block_on(batcher.infer(case(2.0)))
            .expect("after the panic");
        assert_eq!(next.prediction.h24.p_o2_any, 2.0);
        assert_eq!(batcher.stopped(), None);
        assert_eq!(batcher.panics_and_restarts(), (1, 0));
        assert!(
            metrics.encode().contains("oxbox_inference_panics_total 1"),
            "{}",
            metrics.encode()
        );
    }

    #[test]
    fn a_panic_outside_the_forward_pass_restarts_the_loop_until_it_gives_up() {
        // A panic payload whose drop panics: the forward pass's panic is
        // caught, then dropping its payload panics again, outside the
        // forward pass, in the batching loop itself.
        struct Bomb;
        impl Drop for Bomb {
            fn drop(&mut self) {
                panic!("injected fault in the batching loop");
            }
        }
        let forward = |inputs: &[ModelInput]| -> Result<Vec<Prediction>, ModelError> {
            if inputs.iter().any(|i| tag(i) == 13.0) {
                std::panic::panic_any(Bomb);
            }
            Ok(inputs.iter().map(|i| prediction(tag(i) as f32)).collect())
        };
        let metrics = Arc::new(Metrics::new());
        let batcher =
            Batcher::with_forward(forward, 1, Duration::ZERO, Arc::clone(&metrics)).expect("start");
        let rt = runtime();
        let lost = rt.block_on(batcher.infer(case(13.0)));
        assert!(matches!(lost, Err(BatchError::Lost)), "{lost:?}");
        // The loop was restarted: the next case is served, still ready.
        let next = rt
            .block_on(batcher.infer(case(2.0)))
            .expect("after a restart");
        assert_eq!(next.prediction.h24.p_o2_any, 2.0);
        assert_eq!(batcher.stopped(), None);
        assert_eq!(batcher.panics_and_restarts(), (1, 1));
        // Past MAX_RESTARTS within the window the thread stops and says why.
        for _ in 0..MAX_RESTARTS {
            let lost = rt.block_on(batcher.infer(case(13.0)));
            assert!(matches!(lost, Err(BatchError::Lost)), "{lost:?}");
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let reason = loop {
            if let Some(reason) = batcher.stopped() {
                break reason;
            }
            assert!(Instant::now() < deadline, "the thread did not stop");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(reason.contains("restart the server"), "{reason}");
        assert!(
            reason.contains("injected fault in the batching loop"),
            "{reason}"
        );
        let after = rt.block_on(batcher.infer(case(2.0)));
        assert!(matches!(after, Err(BatchError::Stopped)), "{after:?}");
        assert!(
            metrics.encode().contains(&format!(
                "oxbox_inference_restarts_total {}",
                MAX_RESTARTS + 1
            )),
            "{}",
            metrics.encode()
        );
    }

    #[test]
    fn a_forward_pass_that_keeps_panicking_makes_the_batcher_unready_until_one_succeeds() {
        // Panics on every case tagged 13: three in a row leave the batcher
        // unready (readiness 503), and the next success makes it ready.
        let forward = forward_panicking_on_13;
        let metrics = Arc::new(Metrics::new());
        let batcher = Batcher::with_forward(forward, 1, Duration::ZERO, metrics).expect("start");
        let rt = runtime();
        for attempt in 1..=UNREADY_AFTER_PANICS {
            assert_eq!(batcher.unready(), None, "before attempt {attempt}");
            let failed = rt.block_on(batcher.infer(case(13.0)));
            assert!(matches!(failed, Err(BatchError::Panicked(_))), "{failed:?}");
        }
        let reason = batcher.unready().expect("unready after 3 panics in a row");
        assert!(reason.contains("panicked on the last 3"), "{reason}");
        // Still not stopped: the thread serves, and a success heals it.
        assert_eq!(batcher.stopped(), None);
        let ok = rt.block_on(batcher.infer(case(2.0))).expect("a good case");
        assert_eq!(ok.prediction.h24.p_o2_any, 2.0);
        assert_eq!(batcher.unready(), None);
        // Panics with successes in between never add up.
        for _ in 0..4 {
            let _ = rt.block_on(batcher.infer(case(13.0)));
            let _ = rt.block_on(batcher.infer(case(2.0)));
        }
        assert_eq!(batcher.unready(), None);
    }

    #[test]
    fn a_panic_in_a_shared_batch_fails_only_the_poisoned_case() {
        // Batches of up to 8, collected over 200 ms, so the three cases
        // below share one forward pass.
        let forward = forward_panicking_on_13;
        let metrics = Arc::new(Metrics::new());
        let batcher =
            Batcher::with_forward(forward, 8, Duration::from_millis(200), metrics).expect("start");
        let rt = runtime();
        let (a, b, c) = rt.block_on(async {
            tokio::join!(
                batcher.infer(case(1.0)),
                batcher.infer(case(13.0)),
                batcher.infer(case(3.0))
            )
        });
        assert_eq!(a.expect("a").prediction.h24.p_o2_any, 1.0);
        assert!(matches!(b, Err(BatchError::Panicked(_))), "{b:?}");
        assert_eq!(c.expect("c").prediction.h24.p_o2_any, 3.0);
        // One panic for the shared batch, one for the poisoned case alone.
        assert_eq!(batcher.panics_and_restarts(), (2, 0));
        assert_eq!(batcher.stopped(), None);
    }
}

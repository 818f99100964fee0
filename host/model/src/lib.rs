//! Model: the EXAM-style multimodal network (candle), its package format,
//! the compute device, and single-case inference.
//!
//! - [`package`]: `model.toml` + `weights.safetensors`, checked, digested;
//! - [`demo`]: the trained demo model compiled into the binary;
//! - [`net`]: the network — pure model code, trainable batch norm;
//! - [`cpu_conv`], [`cpu_conv_grad`], [`cpu_batch_norm`]: the CPU kernels
//!   for inference (fused, folded convolution) and training (convolution
//!   and batch norm with backward passes); [`winograd`]: the 3×3
//!   stride-1 convolutions in the Winograd domain; [`packed_gemm`] and
//!   [`narrow_gemm`]: the inference products with weights packed at load
//!   (the second for few columns, on AVX-512 and AVX2); [`vector_isa`]: which
//!   vector instructions they use (AVX-512, AVX2 or portable code);
//! - this module: choosing the device, loading a package for inference
//!   (batch norm folded into the convolutions), encoding an EMR record, and
//!   turning cumulative logits into the six probabilities and exam scores.
//!
//! Outcome scale: oxygen level 0 room air, 1 low-flow O₂, 2 high-flow O₂ or
//! NIV, 3 mechanical ventilation, 4 death. The head predicts P(level ≥ k)
//! for k = 1..4 per horizon; P(≥1), P(≥2), P(≥3) are reported and the exam
//! score is the expected level / 4 = Σₖ P(level ≥ k) / 4.

pub mod conv_bench;
pub mod cpu_batch_norm;
pub mod cpu_conv;
pub mod cpu_conv_grad;
pub mod demo;
pub mod dense_head;
pub mod narrow_gemm;
pub mod net;
pub mod package;
pub mod packed_gemm;
pub mod promote;
mod scratch;
pub mod stem_pool;
pub mod vector_isa;
pub mod winograd;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::Serialize;

pub use net::{ExamNet, ParameterGroup};
pub use package::{
    Architecture, Backbone, ModelManifest, ModelPackage, ModelProvenance, PackageBytes,
};
pub use promote::promote;

/// A compute device named in the config (`model.device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The CPU.
    Cpu,
    /// CUDA device with this ordinal.
    Cuda(usize),
}

/// Whether the kernels' `_avx2` copies run: the CPU has AVX2 and FMA and
/// no cap ([`vector_isa::cap`]) keeps them to portable code.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma() -> bool {
    vector_isa::active() >= vector_isa::VectorIsa::Avx2
}

/// Errors from packages, devices and inference.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A package file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// `model.toml` is malformed or inconsistent.
    #[error("model package {path}: {reason}")]
    Invalid {
        /// The manifest.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The device named in the config is not available in this build or
    /// on this machine.
    #[error("device {device}: {reason}")]
    Device {
        /// The device, as configured.
        device: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// A tensor operation failed (shapes, weights that do not fit the
    /// architecture, …).
    #[error("model: {0}")]
    Tensor(#[from] candle_core::Error),
    /// The input does not fit the model.
    #[error("model input: {0}")]
    Input(String),
}

/// The compute device for a config's `model.device`.
///
/// # Errors
/// [`ModelError::Device`] for CUDA on a build without the `cuda` feature or
/// a machine without that GPU.
pub fn select_device(spec: DeviceSpec) -> Result<Device, ModelError> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(ordinal) => {
            if cfg!(feature = "cuda") {
                Device::new_cuda(ordinal).map_err(|e| ModelError::Device {
                    device: format!("cuda:{ordinal}"),
                    reason: e.to_string(),
                })
            } else {
                Err(ModelError::Device {
                    device: format!("cuda:{ordinal}"),
                    reason: "this oxbox was built without the `cuda` feature".to_owned(),
                })
            }
        }
    }
}

/// Threads the CPU kernels use (the global rayon pool: `model.threads`, or
/// every core).
pub fn compute_threads() -> usize {
    rayon::current_num_threads()
}

/// Sizes the CPU kernels' thread pool (`model.threads`; 0 = every core).
/// Call once, before the first inference; later calls change nothing.
pub fn set_compute_threads(threads: usize) {
    if threads > 0 {
        // Fails only when the pool already exists: then it stays as it is.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global();
    }
}

/// Runs `f` on a thread of the compute pool (on this one when it is a
/// pool thread), while the pool's other threads poll for its parallel
/// sections' tasks ([`poll_until`]).
///
/// A forward pass's parallel sections, about 40 in a ResNet-18, then
/// start from a pool thread and cost well under a microsecond each;
/// started from outside the pool, each handed its work over and slept
/// until the pool woke it, about 16 µs a section on a 2-core box (1 Dec
/// 2026, AMD EPYC). And rayon sends a thread that finds no work for a few
/// dozen rounds (tens of microseconds: the gap between two sections, the
/// end of a section split unevenly) to sleep, to be woken for the next
/// section through the kernel, on a virtual machine through the
/// hypervisor: about 40 `futex` calls a pass. The pool's other
/// threads therefore run a polling job for as long as the pass runs,
/// which takes the sections' tasks as they come instead of sleeping
/// (12 465 → 7 123 `futex` calls in 300 passes): a pass takes 0.956 and
/// 0.965 of the time before (medians of the per-round ratios, two sets
/// of ten alternating rounds of 300 passes, 1 Dec 2026, AMD EPYC).
fn on_compute_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::join(
        || {
            let _pollers = Pollers::start();
            f()
        },
        || (),
    )
    .0
}

/// The polling jobs ([`poll_until`]) on the pool's threads other than
/// this one, for as long as it lives: dropped when the pass ends (or
/// unwinds), it stops them.
struct Pollers(Arc<AtomicBool>);

impl Pollers {
    /// Starts a polling job on every other thread of the current pool
    /// (none on a pool of one).
    fn start() -> Self {
        let done = Arc::new(AtomicBool::new(false));
        if rayon::current_num_threads() > 1 {
            let owner = rayon::current_thread_index();
            let done = Arc::clone(&done);
            rayon::spawn_broadcast(move |thread| {
                // Not on the pass's own thread: it would poll until its
                // own pass ended, inside that pass.
                if Some(thread.index()) != owner {
                    poll_until(&done);
                }
            });
        }
        Self(done)
    }
}

impl Drop for Pollers {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// A polling thread ([`poll_until`]) stops after this long without a
/// task: far longer than the gaps between a pass's sections, and what
/// bounds the wait where its pass cannot end before it stops (a thread
/// that took one of the pass's tasks just before it took the polling
/// job, and picks that job up while it waits inside the task).
const POLL_IDLE_LIMIT: Duration = Duration::from_micros(200);

/// Runs the pool's pending tasks (a section's share, another request's
/// pass) until `done`, polling in between instead of sleeping, or until
/// it finds none for [`POLL_IDLE_LIMIT`].
fn poll_until(done: &AtomicBool) {
    let mut last_task = Instant::now();
    while !done.load(Ordering::Acquire) {
        if rayon::yield_now() == Some(rayon::Yield::Executed) {
            last_task = Instant::now();
        } else if last_task.elapsed() > POLL_IDLE_LIMIT {
            return;
        } else {
            for _ in 0..16 {
                std::hint::spin_loop();
            }
        }
    }
}

/// Probabilities for one horizon.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct HorizonPrediction {
    /// P(level ≥ 1): any supplemental oxygen.
    pub p_o2_any: f32,
    /// P(level ≥ 2): high-flow oxygen or non-invasive ventilation.
    pub p_o2_high_flow_or_niv: f32,
    /// P(level ≥ 3): mechanical ventilation or death.
    pub p_ventilation_or_death: f32,
    /// Expected oxygen level / 4, in [0, 1].
    pub exam_score: f32,
}

/// A prediction at 24 h and 72 h.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Prediction {
    /// Within 24 h.
    #[serde(rename = "24h")]
    pub h24: HorizonPrediction,
    /// Within 72 h.
    #[serde(rename = "72h")]
    pub h72: HorizonPrediction,
}

/// A package loaded for inference on a device.
#[derive(Debug)]
pub struct Model {
    net: ExamNet,
    package: ModelPackage,
    device: Device,
}

impl Model {
    /// Loads `package` onto `device` and folds batch norm into the
    /// convolutions; on the CPU a warm-up pass then transforms the 3×3
    /// convolutions' weights into the Winograd forms they run with.
    ///
    /// # Errors
    /// [`ModelError::Tensor`] when the weights do not fit the architecture.
    pub fn load(package: ModelPackage, device: &Device) -> Result<Self, ModelError> {
        let bytes = std::fs::read(package.weights_path()).map_err(|source| ModelError::Io {
            path: package.weights_path().display().to_string(),
            source,
        })?;
        let sha256 = hex::encode(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref());
        if sha256 != package.weights_sha256 {
            return Err(ModelError::Invalid {
                path: package.weights_path().display().to_string(),
                reason: "changed since the package was read (its digest would not be \
                         the weights loaded)"
                    .to_owned(),
            });
        }
        Self::from_weights(package, bytes, device)
    }

    /// Loads a package from its bytes onto `device`: the digest is computed
    /// over exactly these bytes, and these bytes are the weights loaded;
    /// `dir` is where the package lives (or will).
    ///
    /// # Errors
    /// [`ModelError::Invalid`] for a bad manifest, [`ModelError::Tensor`]
    /// when the weights do not fit the architecture.
    pub fn from_bytes(
        bytes: package::PackageBytes,
        dir: &Path,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let package = bytes.package(dir)?;
        Self::from_weights(package, bytes.weights, device)
    }

    fn from_weights(
        package: ModelPackage,
        bytes: Vec<u8>,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let vb = VarBuilder::from_buffered_safetensors(bytes, DType::F32, device)?;
        let manifest = &package.manifest;
        let mut net = ExamNet::new(&manifest.architecture, manifest.emr.len(), vb)?;
        net.fold_batch_norm()?;
        let size = manifest.input_size as usize;
        let model = Self {
            net,
            package,
            device: device.clone(),
        };
        if device.is_cpu() && model.uses_image() {
            // One pass at the input size transforms every convolution's
            // weights into the Winograd form it runs with, now rather than
            // on the first case (and sizes the kernels' scratch buffers).
            model.predict(Some(&vec![0.0; size * size]), &[])?;
        }
        Ok(model)
    }

    /// The package this model came from.
    pub fn package(&self) -> &ModelPackage {
        &self.package
    }

    /// Whether the model reads the radiograph.
    pub fn uses_image(&self) -> bool {
        self.net.uses_image()
    }

    /// Encodes canonical features (by name; absent or `None` = missing) as
    /// normalised values and missing indicators, in the model's order
    /// ([`package::encode_emr`]).
    pub fn encode_emr(&self, features: &[(String, Option<f64>)]) -> (Vec<f32>, Vec<f32>) {
        package::encode_emr(&self.package.manifest.emr, features)
    }

    /// Predicts one case: the canonical S×S image (required unless the model
    /// is EMR-only) and canonical features.
    ///
    /// # Errors
    /// [`ModelError::Input`] for an image of the wrong size or a missing
    /// image; [`ModelError::Tensor`] on tensor failures.
    pub fn predict(
        &self,
        image: Option<&[f32]>,
        features: &[(String, Option<f64>)],
    ) -> Result<Prediction, ModelError> {
        let case = ModelInput {
            image: image.map(<[f32]>::to_vec),
            features: features.to_vec(),
        };
        let mut out = self.predict_batch(std::slice::from_ref(&case))?;
        out.pop()
            .ok_or_else(|| ModelError::Input("empty batch".to_owned()))
    }

    /// Checks one case against the model: the image's size, that an image
    /// model gets one, and every present feature the model uses against
    /// the range of its manifest (`[[emr]] min`/`max`, which may be
    /// narrower than the schema's: the encoding would otherwise clamp such
    /// a value silently). Features the model does not use are not its
    /// concern (a model may use a subset of the schema).
    ///
    /// # Errors
    /// [`ModelError::Input`], saying what is wrong — naming a feature and
    /// the model's range, never the value.
    pub fn check_input(&self, case: &ModelInput) -> Result<(), ModelError> {
        let manifest = &self.package.manifest;
        let size = manifest.input_size as usize;
        match (self.net.uses_image(), &case.image) {
            (true, Some(pixels)) if pixels.len() != size * size => {
                return Err(ModelError::Input(format!(
                    "image has {} values, the model takes {size}x{size}",
                    pixels.len()
                )));
            }
            (true, None) => {
                return Err(ModelError::Input(
                    "this model needs a radiograph".to_owned(),
                ));
            }
            _ => {}
        }
        for spec in &manifest.emr {
            let value = case
                .features
                .iter()
                .find(|(name, _)| *name == spec.name)
                .and_then(|(_, v)| *v);
            if value.is_some_and(|v| !(spec.min..=spec.max).contains(&v)) {
                return Err(ModelError::Input(format!(
                    "{} is outside the range model {} {} takes ({}..={} {}); the value is not shown",
                    spec.name, manifest.name, manifest.version, spec.min, spec.max, spec.unit
                )));
            }
        }
        Ok(())
    }

    /// Predicts a batch of cases in one forward pass (what the server's
    /// dynamic batching runs). Results are in the cases' order.
    ///
    /// # Errors
    /// As [`Model::predict`], for the first case at fault.
    pub fn predict_batch(&self, cases: &[ModelInput]) -> Result<Vec<Prediction>, ModelError> {
        let batch = cases.len();
        if batch == 0 {
            return Ok(Vec::new());
        }
        cases.iter().try_for_each(|c| self.check_input(c))?;
        let size = self.package.manifest.input_size as usize;
        let image = if self.net.uses_image() {
            let mut pixels = Vec::with_capacity(batch * size * size);
            for case in cases {
                pixels.extend_from_slice(case.image.as_deref().unwrap_or_default());
            }
            Some(Tensor::from_vec(
                pixels,
                (batch, 1, size, size),
                &self.device,
            )?)
        } else {
            None
        };
        let n = self.package.manifest.emr.len();
        let mut values = Vec::with_capacity(batch * n);
        let mut missing = Vec::with_capacity(batch * n);
        for case in cases {
            let (v, m) = self.encode_emr(&case.features);
            values.extend(v);
            missing.extend(m);
        }
        let values = Tensor::from_vec(values, (batch, n), &self.device)?;
        let missing = Tensor::from_vec(missing, (batch, n), &self.device)?;
        let forward = || self.net.probabilities(image.as_ref(), &values, &missing);
        // The CPU kernels' parallel sections start cheaply from a pool
        // thread; a GPU pass stays on the caller's thread.
        let p = if self.device.is_cpu() {
            on_compute_pool(forward)
        } else {
            forward()
        }?
        .to_dtype(DType::F32)?
        .to_vec3::<f32>()?;
        let horizon = |h: &[f32]| HorizonPrediction {
            p_o2_any: h[0],
            p_o2_high_flow_or_niv: h[1],
            p_ventilation_or_death: h[2],
            exam_score: h.iter().sum::<f32>() / 4.0,
        };
        Ok(p.iter()
            .map(|case| Prediction {
                h24: horizon(&case[0]),
                h72: horizon(&case[1]),
            })
            .collect())
    }
}

/// One case as the model takes it: the canonical S×S image (row-major; none
/// for EMR-only models) and canonical features by name.
#[derive(Debug, Clone, Default)]
pub struct ModelInput {
    /// The canonical image.
    pub image: Option<Vec<f32>>,
    /// Canonical features (absent or `None` = missing).
    pub features: Vec<(String, Option<f64>)>,
}

/// An untrained manifest: EMR schema v1 with its plausible ranges and
/// typical emergency-department normalisation, `trained = false`.
pub fn default_manifest(name: &str, architecture: Architecture, input_size: u32) -> ModelManifest {
    let emr: Vec<package::EmrFeature> = oxbox_emr_schema::FEATURES
        .iter()
        .map(|f| {
            let (mean, std) = package::default_statistics(f.name);
            package::EmrFeature {
                name: f.name.to_owned(),
                unit: f.unit.to_owned(),
                min: f.min,
                max: f.max,
                mean,
                std,
                log: false,
            }
        })
        .collect();
    ModelManifest {
        name: name.to_owned(),
        version: "0.1.0".to_owned(),
        trained: false,
        input_size,
        architecture,
        federation: None,
        emr,
    }
}

/// Writes a package with a deterministic random initialisation: He-normal
/// convolutions, uniform ±1/√fan-in linear layers, identity batch norm,
/// thresholds −1, −0.3, 0.4, 1.1. `trained = false`.
///
/// # Errors
/// [`ModelError::Io`] or [`ModelError::Tensor`].
pub fn init_package(
    dir: &Path,
    name: &str,
    architecture: Architecture,
    input_size: u32,
    seed: u64,
) -> Result<ModelPackage, ModelError> {
    let manifest = default_manifest(name, architecture, input_size);
    manifest.validate().map_err(|reason| ModelError::Invalid {
        path: dir.join(package::MANIFEST_FILE).display().to_string(),
        reason,
    })?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    ExamNet::new(&manifest.architecture, manifest.emr.len(), vb)?;
    let mut rng = oxbox_rng::Pcg::from_state(seed ^ 0x6f78_626f_785f_696e);
    let data = varmap
        .data()
        .lock()
        .map_err(|_| ModelError::Input("weights lock poisoned".to_owned()))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let count: usize = dims.iter().product();
        let fan_in: usize = dims.iter().skip(1).product::<usize>().max(1);
        let values: Vec<f32> = if name.ends_with("running_var")
            || (name.contains(".bn.") && name.ends_with("weight"))
        {
            vec![1.0; count]
        } else if name.ends_with("running_mean") || name.ends_with("bias") {
            vec![0.0; count]
        } else if name.ends_with("threshold_base") {
            vec![-1.0; count]
        } else if name.ends_with("threshold_steps") {
            // softplus(0.1868) ≈ 0.7: thresholds −1, −0.3, 0.4, 1.1.
            vec![0.1868; count]
        } else if dims.len() == 4 {
            let std = (2.0 / fan_in as f64).sqrt();
            (0..count).map(|_| (rng.normal() * std) as f32).collect()
        } else {
            let bound = 1.0 / (fan_in as f64).sqrt();
            (0..count)
                .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
                .collect()
        };
        var.set(&Tensor::from_vec(values, dims.as_slice(), &Device::Cpu)?)?;
    }
    drop(data);
    std::fs::create_dir_all(dir).map_err(|source| ModelError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let weights = dir.join(package::WEIGHTS_FILE);
    varmap.save(&weights)?;
    let text = toml::to_string(&manifest).map_err(|e| ModelError::Invalid {
        path: dir.join(package::MANIFEST_FILE).display().to_string(),
        reason: e.to_string(),
    })?;
    let manifest_path = dir.join(package::MANIFEST_FILE);
    std::fs::write(&manifest_path, text).map_err(|source| ModelError::Io {
        path: manifest_path.display().to_string(),
        source,
    })?;
    ModelPackage::load(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arch(backbone: Backbone, emr_only: bool) -> Architecture {
        Architecture {
            backbone,
            emr_only,
            cross_layers: 2,
            deep_layers: vec![32, 32],
            fusion_layers: vec![32],
        }
    }

    fn check(p: &HorizonPrediction) {
        for v in [
            p.p_o2_any,
            p.p_o2_high_flow_or_niv,
            p.p_ventilation_or_death,
            p.exam_score,
        ] {
            assert!((0.0..=1.0).contains(&v), "{p:?}");
        }
        assert!(
            p.p_o2_any >= p.p_o2_high_flow_or_niv
                && p.p_o2_high_flow_or_niv >= p.p_ventilation_or_death,
            "{p:?}"
        );
    }

    /// A freshly initialised `tiny` image model of input side `size`
    /// (seed `seed`), loaded on the CPU; `dir` holds its package.
    fn tiny_model(dir: &Path, size: u32, seed: u64) -> Model {
        let package =
            init_package(dir, "test", arch(Backbone::Tiny, false), size, seed).expect("init");
        Model::load(package, &Device::Cpu).expect("load")
    }

    #[test]
    fn a_batch_predicts_what_each_case_predicts_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let model = tiny_model(dir.path(), 64, 3);
        let cases: Vec<ModelInput> = (0..3)
            .map(|i| ModelInput {
                image: Some(
                    (0..64 * 64)
                        .map(|p| ((p * (i + 2)) % 97) as f32 / 97.0)
                        .collect(),
                ),
                features: vec![("spo2_pct".to_owned(), Some(85.0 + i as f64 * 5.0))],
            })
            .collect();
        let batch = model.predict_batch(&cases).expect("batch");
        assert_eq!(batch.len(), 3);
        for (case, together) in cases.iter().zip(&batch) {
            let alone = model
                .predict(case.image.as_deref(), &case.features)
                .expect("alone");
            for (a, b) in [(alone.h24, together.h24), (alone.h72, together.h72)] {
                assert!((a.p_o2_any - b.p_o2_any).abs() < 1e-5, "{a:?} vs {b:?}");
                assert!((a.exam_score - b.exam_score).abs() < 1e-5, "{a:?} vs {b:?}");
            }
        }
        // One bad case fails the batch with the reason.
        let mut bad = cases;
        bad[1].image = Some(vec![0.0; 10]);
        let err = model.predict_batch(&bad).expect_err("wrong size");
        assert!(err.to_string().contains("64x64"), "{err}");
    }

    /// A polling thread whose pass never ends stops by itself after
    /// [`POLL_IDLE_LIMIT`] without a task: the bound that keeps a poll
    /// nested inside one of its own pass's tasks from waiting for ever.
    #[test]
    fn polling_stops_by_itself_after_the_idle_limit() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .expect("pool");
        pool.install(|| {
            let started = Instant::now();
            poll_until(&AtomicBool::new(false));
            let took = started.elapsed();
            assert!(took >= POLL_IDLE_LIMIT, "stopped after {took:?}");
            assert!(took < POLL_IDLE_LIMIT * 500, "polled for {took:?}");
        });
    }

    /// Predictions made at once from several threads, which all run on
    /// the compute pool and share its threads' scratch buffers, equal
    /// those made one at a time.
    #[test]
    fn concurrent_predictions_equal_serial_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let model = tiny_model(dir.path(), 96, 5);
        let image = |i: usize| -> Vec<f32> {
            (0..96 * 96)
                .map(|p| ((p * (i + 3)) % 101) as f32 / 101.0)
                .collect()
        };
        let features = vec![("spo2_pct".to_owned(), Some(91.0))];
        let serial: Vec<Prediction> = (0..6)
            .map(|i| model.predict(Some(&image(i)), &features).expect("serial"))
            .collect();
        let concurrent: Vec<Vec<Prediction>> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..6)
                .map(|i| {
                    let (model, features) = (&model, &features);
                    scope.spawn(move || {
                        (0..4)
                            .map(|_| {
                                model
                                    .predict(Some(&image(i)), features)
                                    .expect("concurrent")
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("join"))
                .collect()
        });
        for (i, runs) in concurrent.iter().enumerate() {
            for run in runs {
                assert_eq!(*run, serial[i], "case {i}");
            }
        }
    }

    #[test]
    fn tiny_model_predicts_ordered_probabilities_deterministically() {
        let dir = tempfile::tempdir().expect("tempdir");
        let package =
            init_package(dir.path(), "test", arch(Backbone::Tiny, false), 64, 7).expect("init");
        let digest = package.digest.clone();
        let model = Model::load(package, &Device::Cpu).expect("load");
        let image: Vec<f32> = (0..64 * 64).map(|i| (i % 64) as f32 / 64.0).collect();
        let features = vec![
            ("spo2_pct".to_owned(), Some(88.0)),
            ("age_years".to_owned(), Some(70.0)),
        ];
        let a = model.predict(Some(&image), &features).expect("predict");
        check(&a.h24);
        check(&a.h72);
        // Same seed, same weights, same digest, same prediction.
        let again = tempfile::tempdir().expect("tempdir");
        let package =
            init_package(again.path(), "test", arch(Backbone::Tiny, false), 64, 7).expect("init");
        assert_eq!(package.digest, digest);
        let b = Model::load(package, &Device::Cpu)
            .expect("load")
            .predict(Some(&image), &features)
            .expect("predict");
        assert_eq!(a, b);
        // A missing image is refused for an image model.
        assert!(matches!(
            model.predict(None, &features),
            Err(ModelError::Input(_))
        ));
        assert!(matches!(
            model.predict(Some(&image[..10]), &features),
            Err(ModelError::Input(_))
        ));
    }

    /// Folded for inference on the CPU, the EMR branch, fusion and head
    /// run as plain loops ([`dense_head::DenseHead`]) and give candle's
    /// layers' logits, for image and EMR-only models, at batch 1 and 3,
    /// values present and missing.
    #[test]
    fn dense_head_gives_the_candle_layers_logits() {
        for emr_only in [false, true] {
            let dir = tempfile::tempdir().expect("tempdir");
            let package = init_package(dir.path(), "test", arch(Backbone::Tiny, emr_only), 32, 9)
                .expect("init");
            let mut net = net_of(&package);
            let features = package.manifest.emr.len();
            let unfolded = net.clone();
            net.fold_batch_norm().expect("fold");
            assert!(net.runs_dense_head());
            let mut candle_head = net.clone();
            candle_head.without_dense_head();
            for batch in [1, 3] {
                let image =
                    Tensor::randn(0f32, 1.0, (batch, 1, 32, 32), &Device::Cpu).expect("image");
                let values =
                    Tensor::randn(0f32, 1.0, (batch, features), &Device::Cpu).expect("values");
                // Every third feature missing (0 value, 1 indicator).
                let pattern: Vec<f32> = (0..batch * features)
                    .map(|i| f32::from(u8::from(i % 3 == 0)))
                    .collect();
                let missing =
                    Tensor::from_vec(pattern, (batch, features), &Device::Cpu).expect("missing");
                let values = (values * (1.0 - &missing).expect("present")).expect("zeros");
                let run = |net: &ExamNet| {
                    net.forward((!emr_only).then_some(&image), &values, &missing, false)
                        .expect("forward")
                };
                let (got, want) = (run(&net), run(&candle_head));
                assert_eq!(got.dims(), want.dims());
                assert_eq!(got.dims(), [batch, net::HORIZONS, net::THRESHOLDS]);
                let scale = max_abs(want.clone()).max(1.0);
                let diff = max_abs((&got - &want).expect("sub"));
                assert!(
                    diff / scale < 1e-5,
                    "emr_only {emr_only}, batch {batch}: logits differ by {diff}"
                );
                // And the unfolded network (batch norm separate, candle's
                // layers) agrees within the folding's rounding.
                let diff = max_abs((got - run(&unfolded)).expect("sub"));
                assert!(diff / scale < 1e-4, "unfolded: {diff}");
            }
        }
    }

    /// The largest absolute value of `t`.
    fn max_abs(t: Tensor) -> f32 {
        t.abs()
            .and_then(|t| t.max_all())
            .and_then(|t| t.to_scalar::<f32>())
            .expect("max")
    }

    /// The network of a package, built from its weights file.
    fn net_of(package: &ModelPackage) -> ExamNet {
        let bytes = std::fs::read(package.weights_path()).expect("weights");
        let vb =
            VarBuilder::from_buffered_safetensors(bytes, DType::F32, &Device::Cpu).expect("vb");
        ExamNet::new(
            &package.manifest.architecture,
            package.manifest.emr.len(),
            vb,
        )
        .expect("net")
    }

    #[test]
    fn folded_batch_norm_matches_unfolded_inference() {
        let dir = tempfile::tempdir().expect("tempdir");
        let package =
            init_package(dir.path(), "test", arch(Backbone::Tiny, false), 32, 3).expect("init");
        let mut net = net_of(&package);
        let image = Tensor::randn(0f32, 1.0, (2, 1, 32, 32), &Device::Cpu).expect("image");
        let values = Tensor::randn(0f32, 1.0, (2, 21), &Device::Cpu).expect("values");
        let missing = Tensor::zeros((2, 21), DType::F32, &Device::Cpu).expect("missing");
        let plain = net
            .forward(Some(&image), &values, &missing, false)
            .expect("forward");
        net.fold_batch_norm().expect("fold");
        let folded = net
            .forward(Some(&image), &values, &missing, false)
            .expect("forward");
        let diff = (plain - folded)
            .expect("sub")
            .abs()
            .expect("abs")
            .max_all()
            .expect("max");
        assert!(diff.to_scalar::<f32>().expect("scalar") < 1e-4);
    }

    /// ResNet-18 at 224² with the Winograd kernels, packed weights and
    /// (on AVX2 and AVX-512) the stem and its pool as one kernel gives the
    /// outputs of the im2col + gemm kernels and the separate pool (the
    /// kernels before all three), at batch 1 and 2.
    #[test]
    fn resnet18_outputs_with_winograd_equal_the_im2col_kernels() {
        let dir = tempfile::tempdir().expect("tempdir");
        let package = init_package(dir.path(), "test", arch(Backbone::Resnet18, false), 224, 5)
            .expect("init");
        let mut net = net_of(&package);
        net.fold_batch_norm().expect("fold");
        let mut reference = net.clone();
        reference.plain_gemm();
        // A chest-like image: smooth intensity with ribs-like stripes.
        let image: Vec<f32> = (0..2 * 224 * 224)
            .map(|i| {
                let (y, x) = ((i / 224) % 224, i % 224);
                let (y, x) = (y as f32 / 224.0, x as f32 / 224.0);
                (3.0 * x).sin() * 0.5 + (20.0 * y).cos() * 0.3 + y - 0.5
            })
            .collect();
        let features = package.manifest.emr.len();
        for batch in [1, 2] {
            let pixels = image[..batch * 224 * 224].to_vec();
            let image =
                Tensor::from_vec(pixels, (batch, 1, 224, 224), &Device::Cpu).expect("image");
            let values = Tensor::randn(0f32, 1.0, (batch, features), &Device::Cpu).expect("values");
            let missing =
                Tensor::zeros((batch, features), DType::F32, &Device::Cpu).expect("missing");
            let run = |net: &ExamNet| {
                let logits = net
                    .forward(Some(&image), &values, &missing, false)
                    .expect("forward");
                let probabilities = candle_nn::ops::sigmoid(&logits).expect("sigmoid");
                (logits, probabilities)
            };
            let (logits, probabilities) = run(&net);
            let (want_logits, want_probabilities) = run(&reference);
            let scale = max_abs(want_logits.clone()).max(1.0);
            let logit_diff = max_abs((logits - want_logits).expect("sub"));
            let probability_diff = max_abs((probabilities - want_probabilities).expect("sub"));
            assert!(
                logit_diff / scale < 1e-5,
                "batch {batch}: logits differ by {logit_diff} (scale {scale})"
            );
            assert!(
                probability_diff < 1e-5,
                "batch {batch}: probabilities differ by {probability_diff}"
            );
        }
    }

    #[test]
    fn emr_only_model_needs_no_image_and_digest_tracks_weights() {
        let dir = tempfile::tempdir().expect("tempdir");
        let package =
            init_package(dir.path(), "emr", arch(Backbone::Tiny, true), 224, 1).expect("init");
        let digest = package.digest.clone();
        let model = Model::load(package, &Device::Cpu).expect("load");
        assert!(!model.uses_image());
        let p = model
            .predict(None, &[])
            .expect("all features missing is fine");
        check(&p.h24);
        let other = tempfile::tempdir().expect("tempdir");
        let package =
            init_package(other.path(), "emr", arch(Backbone::Tiny, true), 224, 2).expect("init");
        assert_ne!(package.digest, digest, "other weights, other digest");
    }

    #[test]
    fn differentiable_max_pool_equals_candle_pooling() {
        for (h, w) in [(114, 114), (9, 10), (3, 3)] {
            let x = Tensor::randn(0f32, 1.0, (2, 3, h, w), &Device::Cpu).expect("x");
            let ours = net::max_pool_3x3_stride_2(&x).expect("ours");
            let theirs = x.max_pool2d_with_stride(3, 2).expect("candle");
            assert_eq!(ours.dims(), theirs.dims(), "{h}x{w}");
            let diff = (ours - theirs)
                .and_then(|d| d.abs())
                .and_then(|d| d.max_all())
                .and_then(|d| d.to_scalar::<f32>())
                .expect("diff");
            assert_eq!(diff, 0.0, "{h}x{w}");
        }
        // It has a gradient: 1 at each window's maximum.
        let var = candle_core::Var::from_vec(
            (0..25).map(|i| i as f32).collect::<Vec<_>>(),
            (1, 1, 5, 5),
            &Device::Cpu,
        )
        .expect("var");
        let pooled = net::max_pool_3x3_stride_2(var.as_tensor()).expect("pool");
        let grads = pooled
            .sum_all()
            .and_then(|s| s.backward())
            .expect("backward");
        let g = grads
            .get(var.as_tensor())
            .expect("gradient")
            .flatten_all()
            .and_then(|g| g.to_vec1::<f32>())
            .expect("values");
        // Windows end at (2,2), (2,4), (4,2), (4,4): those are the maxima.
        let hot: Vec<usize> = (0..25).filter(|&i| g[i] > 0.0).collect();
        assert_eq!(hot, vec![12, 14, 22, 24]);
    }

    #[test]
    fn resnet18_has_the_expected_size() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let branch = net::ImageBranch::new(Backbone::Resnet18, vb).expect("resnet18");
        assert_eq!(branch.features(), 512);
        let params: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
        // torchvision ResNet-18 without fc, 1-channel stem: 11.17 M
        // (including batch-norm running statistics).
        assert!((11_100_000..11_300_000).contains(&params), "{params}");
    }

    fn variable_names(architecture: &Architecture) -> Vec<String> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        ExamNet::new(architecture, 5, vb).expect("net");
        let data = varmap.data().lock().expect("lock");
        data.keys().cloned().collect()
    }

    #[test]
    fn every_parameter_is_in_exactly_one_named_group() {
        use std::collections::BTreeSet;
        let names = variable_names(&arch(Backbone::Tiny, false));
        let groups: BTreeSet<ParameterGroup> = names
            .iter()
            .map(|n| ParameterGroup::of(n).unwrap_or_else(|| panic!("{n}: no group")))
            .collect();
        assert_eq!(groups, ParameterGroup::ALL.into_iter().collect());
        for name in &names {
            let group = ParameterGroup::of(name).expect("group");
            let statistic = name.ends_with("running_mean") || name.ends_with("running_var");
            assert_eq!(
                group == ParameterGroup::BatchNormStatistics,
                statistic,
                "{name}"
            );
        }
        assert_eq!(
            ParameterGroup::of("image.stem.bn.running_var"),
            Some(ParameterGroup::BatchNormStatistics)
        );
        assert_eq!(
            ParameterGroup::of("image.stem.bn.weight"),
            Some(ParameterGroup::ImageBackbone)
        );
        assert_eq!(
            ParameterGroup::of("head.threshold_base"),
            Some(ParameterGroup::Head)
        );
        assert_eq!(ParameterGroup::of("other.weight"), None);
        assert_eq!(ParameterGroup::of("nodot"), None);
        for g in ParameterGroup::ALL {
            assert_eq!(ParameterGroup::from_name(g.as_str()), Some(g));
        }
        // An EMR-only network has neither backbone nor batch norm.
        let groups: BTreeSet<ParameterGroup> = variable_names(&arch(Backbone::Tiny, true))
            .iter()
            .filter_map(|n| ParameterGroup::of(n))
            .collect();
        assert_eq!(
            groups,
            [
                ParameterGroup::EmrBranch,
                ParameterGroup::Fusion,
                ParameterGroup::Head
            ]
            .into_iter()
            .collect()
        );
    }

    #[test]
    fn a_package_round_trips_through_bytes_and_its_digest_is_over_the_bytes_loaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let package = init_package(
            &dir.path().join("a"),
            "b",
            arch(Backbone::Tiny, false),
            32,
            4,
        )
        .expect("init");
        let bytes = PackageBytes::read(&package.dir).expect("read");
        assert_eq!(bytes.digest(), package.digest);
        // Written elsewhere: the same package.
        let copy = dir.path().join("copy");
        bytes.write(&copy).expect("write");
        assert_eq!(
            ModelPackage::load(&copy).expect("load").digest,
            package.digest
        );
        // Loaded from the bytes: the same model as from the folder.
        let image = vec![0.25f32; 32 * 32];
        let from_dir = Model::load(package.clone(), &Device::Cpu).expect("load");
        let from_bytes = Model::from_bytes(bytes.clone(), &copy, &Device::Cpu).expect("bytes");
        assert_eq!(from_bytes.package().digest, package.digest);
        let (a, b) = (
            from_dir.predict(Some(&image), &[]).expect("predict"),
            from_bytes.predict(Some(&image), &[]).expect("predict"),
        );
        assert_eq!(a.h24.p_o2_any, b.h24.p_o2_any);
        // One byte different: another digest (a float of a weight, near the end).
        let mut tampered = bytes.clone();
        let last = tampered.weights.len() - 1;
        tampered.weights[last] ^= 1;
        assert_ne!(tampered.digest(), package.digest);
        assert_ne!(
            Model::from_bytes(tampered.clone(), &copy, &Device::Cpu)
                .expect("still loads")
                .package()
                .digest,
            package.digest
        );
        // Weights changed on disk after the package was read: refused, not
        // loaded under the old digest.
        std::fs::write(package.weights_path(), &tampered.weights).expect("tamper");
        let err = Model::load(package, &Device::Cpu).expect_err("refused");
        assert!(err.to_string().contains("changed since"), "{err}");
        // A bad manifest in bytes names the file.
        let bad = PackageBytes {
            manifest: b"name = 1".to_vec(),
            weights: bytes.weights,
        };
        assert!(bad.package(&copy).is_err());
    }

    /// The first CUDA device, on a `cuda` build: a build with the feature
    /// is meant for a machine with a GPU, so its absence fails the tests that
    /// need it (loudly) instead of passing them unrun. `scripts/gpu-check.sh`
    /// runs them and skips, saying so, on a machine without an NVIDIA GPU.
    #[cfg(feature = "cuda")]
    fn cuda() -> Device {
        match select_device(DeviceSpec::Cuda(0)) {
            Ok(device) => device,
            Err(e) => panic!("no usable CUDA device for the GPU tests: {e}"),
        }
    }

    /// Largest |a - b| over two tensors of the same shape, and the scale
    /// (largest |a|, at least 1) it is compared with.
    #[cfg(feature = "cuda")]
    fn difference(a: &Tensor, b: &Tensor) -> (f32, f32) {
        let max = |t: Tensor| {
            t.abs()
                .and_then(|t| t.flatten_all())
                .and_then(|t| t.max(0))
                .and_then(|t| t.to_scalar::<f32>())
                .expect("max")
        };
        let b = b.to_device(a.device()).expect("to device");
        (max((a - &b).expect("sub")), max(a.clone()).max(1.0))
    }

    /// Inference on the GPU gives the CPU's predictions within 1e-4: the
    /// demo model (the box's default) and ResNet-18 at 224² (the image
    /// model), at batch 1, 8 and 32.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_predictions_equal_the_cpu_predictions() {
        let gpu = cuda();
        let dir = tempfile::tempdir().expect("tempdir");
        let packages = [
            demo::materialize(dir.path()).expect("demo"),
            init_package(
                &dir.path().join("resnet18"),
                "gpu",
                arch(Backbone::Resnet18, false),
                224,
                7,
            )
            .expect("init"),
        ];
        for package in packages {
            let size = package.manifest.input_size as usize;
            let cpu_model = Model::load(package.clone(), &Device::Cpu).expect("cpu");
            let gpu_model = Model::load(package, &gpu).expect("gpu");
            for batch in [1, 8, 32] {
                let cases: Vec<ModelInput> = (0..batch)
                    .map(|i| ModelInput {
                        image: Some(
                            (0..size * size)
                                .map(|p| {
                                    let (y, x) = ((p / size) as f32, (p % size) as f32);
                                    ((x * 0.05 + i as f32).sin() * 0.3 + y / size as f32)
                                        .clamp(0.0, 1.0)
                                })
                                .collect(),
                        ),
                        features: vec![
                            ("spo2_pct".to_owned(), Some(80.0 + i as f64)),
                            ("resp_rate_bpm".to_owned(), Some(14.0 + i as f64)),
                        ],
                    })
                    .collect();
                let want = cpu_model.predict_batch(&cases).expect("cpu predict");
                let got = gpu_model.predict_batch(&cases).expect("gpu predict");
                assert_eq!(want.len(), got.len());
                for (w, g) in want.iter().zip(&got) {
                    for (a, b) in [(w.h24, g.h24), (w.h72, g.h72)] {
                        for (x, y) in [
                            (a.p_o2_any, b.p_o2_any),
                            (a.p_o2_high_flow_or_niv, b.p_o2_high_flow_or_niv),
                            (a.p_ventilation_or_death, b.p_ventilation_or_death),
                            (a.exam_score, b.exam_score),
                        ] {
                            assert!(
                                (x - y).abs() <= 1e-4,
                                "batch {batch}: CPU {a:?} vs GPU {b:?}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Training on the GPU computes what the CPU computes: the same weights
    /// give the same training-mode logits (batch statistics) and the same
    /// gradient for every variable, within 1e-4 of their scale.
    #[cfg(feature = "cuda")]
    #[test]
    fn cuda_training_gradients_equal_the_cpu_gradients() {
        let gpu = cuda();
        let architecture = arch(Backbone::Resnet18, false);
        let features = 21;
        let cpu_vars = candle_nn::VarMap::new();
        let cpu_net = ExamNet::new(
            &architecture,
            features,
            VarBuilder::from_varmap(&cpu_vars, DType::F32, &Device::Cpu),
        )
        .expect("cpu net");
        let gpu_vars = candle_nn::VarMap::new();
        let gpu_net = ExamNet::new(
            &architecture,
            features,
            VarBuilder::from_varmap(&gpu_vars, DType::F32, &gpu),
        )
        .expect("gpu net");
        let cpu_data = cpu_vars.data().lock().expect("lock").clone();
        for (name, var) in gpu_vars.data().lock().expect("lock").iter() {
            let source = cpu_data.get(name).expect("same variables");
            var.set(&source.as_tensor().to_device(&gpu).expect("copy"))
                .expect("set");
        }
        let (batch, size) = (4, 64);
        let image = Tensor::randn(0.5f32, 0.2, (batch, 1, size, size), &Device::Cpu).expect("x");
        let values = Tensor::randn(0f32, 1.0, (batch, features), &Device::Cpu).expect("values");
        let missing = Tensor::zeros((batch, features), DType::F32, &Device::Cpu).expect("missing");
        let run = |net: &ExamNet, device: &Device| {
            let on = |t: &Tensor| t.to_device(device).expect("to device");
            let logits = net
                .forward(Some(&on(&image)), &on(&values), &on(&missing), true)
                .expect("forward");
            // A loss that weighs every output differently.
            let weights = Tensor::arange(1f32, 1.0 + logits.elem_count() as f32, device)
                .and_then(|w| w.reshape(logits.shape()))
                .expect("weights");
            let loss = (&logits * &weights)
                .and_then(|l| l.sum_all())
                .expect("loss");
            (logits, loss.backward().expect("backward"))
        };
        let (cpu_logits, cpu_grads) = run(&cpu_net, &Device::Cpu);
        let (gpu_logits, gpu_grads) = run(&gpu_net, &gpu);
        let (diff, scale) = difference(&cpu_logits, &gpu_logits);
        assert!(
            diff / scale <= 1e-4,
            "logits differ by {diff} (scale {scale})"
        );
        let gpu_data = gpu_vars.data().lock().expect("lock").clone();
        let mut compared = 0;
        for (name, var) in &cpu_data {
            let Some(want) = cpu_grads.get(var.as_tensor()) else {
                continue;
            };
            let got = gpu_grads
                .get(gpu_data[name].as_tensor())
                .unwrap_or_else(|| panic!("{name}: a gradient on the CPU, none on the GPU"));
            let (diff, scale) = difference(want, got);
            assert!(
                diff / scale <= 1e-4,
                "{name}: gradients differ by {diff} (scale {scale})"
            );
            compared += 1;
        }
        assert!(compared > 50, "only {compared} gradients compared");
    }
}

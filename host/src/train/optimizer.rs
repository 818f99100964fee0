//! AdamW with decoupled weight decay, whose moments can be saved and
//! restored, so that `oxbox train --resume` continues exactly where an
//! interrupted run stopped (candle-nn's `AdamW` keeps its moments private).
//! The update is candle-nn's, term for term; a test holds them equal.

use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, Device, Layout, Result, Storage, Tensor, Var};
use rayon::prelude::*;

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate.
    pub learning_rate: f64,
    /// Decoupled weight decay (applied to parameters `decays` selects).
    pub weight_decay: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator guard.
    pub eps: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            learning_rate: 1e-3,
            weight_decay: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

#[derive(Debug)]
struct Param {
    name: String,
    var: Var,
    decay: bool,
    m: Tensor,
    v: Tensor,
}

/// AdamW over named variables.
#[derive(Debug)]
pub struct AdamW {
    params: Vec<Param>,
    config: AdamWConfig,
    step: u64,
}

impl AdamW {
    /// An optimizer for `vars` (sorted by name, so the state file is
    /// deterministic); `decays(name)` says which get weight decay.
    ///
    /// # Errors
    /// On tensor errors.
    pub fn new(
        mut vars: Vec<(String, Var)>,
        config: AdamWConfig,
        decays: impl Fn(&str) -> bool,
    ) -> Result<Self> {
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let params = vars
            .into_iter()
            .map(|(name, var)| {
                Ok(Param {
                    decay: decays(&name),
                    m: var.zeros_like()?,
                    v: var.zeros_like()?,
                    name,
                    var,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            params,
            config,
            step: 0,
        })
    }

    /// Sets the learning rate for the following steps.
    pub fn set_learning_rate(&mut self, learning_rate: f64) {
        self.config.learning_rate = learning_rate;
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One update from `grads`; variables without a gradient are left as
    /// they are.
    ///
    /// # Errors
    /// On tensor errors.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let t = i32::try_from(self.step).unwrap_or(i32::MAX);
        let scale_m = 1.0 / (1.0 - c.beta1.powi(t));
        let scale_v = 1.0 / (1.0 - c.beta2.powi(t));
        for p in &mut self.params {
            let Some(g) = grads.get(p.var.as_tensor()) else {
                continue;
            };
            if let Some((theta, m, v)) = fused_update(p, g, c, (scale_m, scale_v))? {
                let (shape, device) = (p.var.shape().clone(), p.var.device().clone());
                p.var
                    .set(&Tensor::from_vec(theta, shape.clone(), &device)?)?;
                p.m = Tensor::from_vec(m, shape.clone(), &device)?;
                p.v = Tensor::from_vec(v, shape, &device)?;
                continue;
            }
            let m = ((&p.m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&p.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let theta = if p.decay {
                (p.var.as_tensor() * (1.0 - c.learning_rate * c.weight_decay))?
            } else {
                p.var.as_tensor().clone()
            };
            let adjusted = ((&m * scale_m)? / ((&v * scale_v)?.sqrt()? + c.eps)?)?;
            p.var.set(&(theta - (adjusted * c.learning_rate)?)?)?;
            p.m = m;
            p.v = v;
        }
        Ok(())
    }

    /// Writes both moments of every variable to a safetensors file (the
    /// step count goes into the training state).
    ///
    /// # Errors
    /// On I/O or tensor errors.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors = HashMap::new();
        for p in &self.params {
            tensors.insert(format!("m.{}", p.name), p.m.clone());
            tensors.insert(format!("v.{}", p.name), p.v.clone());
        }
        candle_core::safetensors::save(&tensors, path)
    }

    /// Restores the moments written by [`AdamW::save`] and the step count.
    ///
    /// # Errors
    /// When the file is unreadable or lacks a variable's moments, or a
    /// shape differs.
    pub fn load(&mut self, path: &Path, step: u64) -> Result<()> {
        let mut tensors = candle_core::safetensors::load(path, &Device::Cpu)?;
        for p in &mut self.params {
            for (prefix, slot) in [("m", &mut p.m), ("v", &mut p.v)] {
                let key = format!("{prefix}.{}", p.name);
                let t = tensors
                    .remove(&key)
                    .ok_or_else(|| candle_core::Error::Msg(format!("optimizer state: no {key}")))?;
                if t.dims() != p.var.dims() {
                    candle_core::bail!("optimizer state: {key} has shape {:?}", t.dims());
                }
                *slot = t;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// θ, m and v after a step.
type Updated = (Vec<f32>, Vec<f32>, Vec<f32>);

/// Elements per task of [`fused_update`].
const UPDATE_CHUNK: usize = 1 << 14;

/// The values of a contiguous f32 CPU tensor, or `None` (another device
/// or type, or a strided layout).
fn cpu_f32<'a>(storage: &'a Storage, layout: &Layout) -> Option<&'a [f32]> {
    match storage {
        Storage::Cpu(CpuStorage::F32(values)) => {
            layout.contiguous_offsets().map(|(a, b)| &values[a..b])
        }
        _ => None,
    }
}

/// One parameter's AdamW update in a single parallel pass over f32 CPU
/// tensors: (θ, m, v) after the step, with the same f32 operations in
/// the same order as the tensor expressions in [`AdamW::step`] (candle
/// multiplies by a scalar rounded to f32), so the results are the same;
/// `None` where the tensors are elsewhere (the caller then runs those
/// expressions).
fn fused_update(
    p: &Param,
    g: &Tensor,
    c: AdamWConfig,
    (scale_m, scale_v): (f64, f64),
) -> Result<Option<Updated>> {
    let guards = [p.var.as_tensor(), &p.m, &p.v, g].map(|t| t.storage_and_layout());
    let [Some(theta), Some(m), Some(v), Some(g)] = guards
        .each_ref()
        .map(|(storage, layout)| cpu_f32(storage, layout))
    else {
        return Ok(None);
    };
    let n = theta.len();
    if m.len() != n || v.len() != n || g.len() != n {
        candle_core::bail!(
            "adamw: {} values with moments of {} and {}",
            n,
            m.len(),
            v.len()
        );
    }
    let f = |x: f64| x as f32;
    let (beta1, one_minus_beta1) = (f(c.beta1), f(1.0 - c.beta1));
    let (beta2, one_minus_beta2) = (f(c.beta2), f(1.0 - c.beta2));
    let (decays, decay) = (p.decay, f(1.0 - c.learning_rate * c.weight_decay));
    let (scale_m, scale_v, eps, lr) = (f(scale_m), f(scale_v), f(c.eps), f(c.learning_rate));
    let (mut theta_next, mut m_next, mut v_next) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
    theta_next
        .par_chunks_mut(UPDATE_CHUNK)
        .zip(m_next.par_chunks_mut(UPDATE_CHUNK))
        .zip(v_next.par_chunks_mut(UPDATE_CHUNK))
        .enumerate()
        .for_each(|(i, ((theta_out, m_out), v_out))| {
            let start = i * UPDATE_CHUNK;
            let range = start..start + theta_out.len();
            let inputs = theta[range.clone()]
                .iter()
                .zip(&m[range.clone()])
                .zip(&v[range.clone()])
                .zip(&g[range]);
            let outputs = theta_out
                .iter_mut()
                .zip(m_out.iter_mut())
                .zip(v_out.iter_mut());
            for (((t_out, m_out), v_out), (((&t, &m), &v), &g)) in outputs.zip(inputs) {
                let m = m * beta1 + g * one_minus_beta1;
                let v = v * beta2 + (g * g) * one_minus_beta2;
                let t = if decays { t * decay } else { t };
                let adjusted = (m * scale_m) / ((v * scale_v).sqrt() + eps);
                *t_out = t - adjusted * lr;
                *m_out = m;
                *v_out = v;
            }
        });
    Ok(Some((theta_next, m_next, v_next)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::Optimizer;

    fn problem(seed: f32) -> (Var, Tensor) {
        let w = Var::from_vec(
            vec![0.3f32 * seed, -0.2, 0.5, 0.1, -0.4, 0.7],
            (2, 3),
            &Device::Cpu,
        )
        .expect("var");
        let x = Tensor::from_vec(vec![1f32, 2.0, -1.0, 0.5, -0.3, 0.8], (3, 2), &Device::Cpu)
            .expect("x");
        (w, x)
    }

    fn loss(w: &Var, x: &Tensor) -> Tensor {
        w.as_tensor()
            .matmul(x)
            .and_then(|y| y.sqr())
            .and_then(|y| y.sum_all())
            .expect("loss")
    }

    #[test]
    fn updates_equal_candle_nn_adamw() {
        let config = AdamWConfig {
            learning_rate: 0.01,
            weight_decay: 0.1,
            ..AdamWConfig::default()
        };
        let (ours, x) = problem(1.0);
        let (theirs, _) = problem(1.0);
        let mut a =
            AdamW::new(vec![("w".to_owned(), ours.clone())], config, |_| true).expect("ours");
        let mut b = candle_nn::AdamW::new(
            vec![theirs.clone()],
            candle_nn::ParamsAdamW {
                lr: config.learning_rate,
                weight_decay: config.weight_decay,
                beta1: config.beta1,
                beta2: config.beta2,
                eps: config.eps,
            },
        )
        .expect("theirs");
        for _ in 0..5 {
            a.step(&loss(&ours, &x).backward().expect("grad"))
                .expect("step");
            b.backward_step(&loss(&theirs, &x)).expect("step");
        }
        let diff = (ours.as_tensor() - theirs.as_tensor())
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff");
        assert!(diff < 1e-7, "{diff}");
        assert_ne!(
            ours.as_tensor().to_vec2::<f32>().expect("values")[0][0],
            0.3,
            "the weights moved"
        );
    }

    #[test]
    fn saved_state_resumes_exactly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("optimizer.safetensors");
        let config = AdamWConfig::default();
        let (straight, x) = problem(2.0);
        let mut a =
            AdamW::new(vec![("w".to_owned(), straight.clone())], config, |_| true).expect("a");
        for _ in 0..3 {
            a.step(&loss(&straight, &x).backward().expect("grad"))
                .expect("step");
        }
        // Interrupted after two steps, restored into a fresh optimizer.
        let (resumed, _) = problem(2.0);
        let mut b =
            AdamW::new(vec![("w".to_owned(), resumed.clone())], config, |_| true).expect("b");
        for _ in 0..2 {
            b.step(&loss(&resumed, &x).backward().expect("grad"))
                .expect("step");
        }
        b.save(&path).expect("save");
        let mut c =
            AdamW::new(vec![("w".to_owned(), resumed.clone())], config, |_| true).expect("c");
        c.load(&path, b.steps()).expect("load");
        c.step(&loss(&resumed, &x).backward().expect("grad"))
            .expect("step");
        assert_eq!(
            straight.as_tensor().to_vec2::<f32>().expect("a"),
            resumed.as_tensor().to_vec2::<f32>().expect("c")
        );
        // A state for other variables is refused.
        let (other, _) = problem(1.0);
        let mut d = AdamW::new(vec![("x".to_owned(), other)], config, |_| true).expect("d");
        assert!(d.load(&path, 2).is_err());
    }
}

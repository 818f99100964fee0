//! The fitting stage of training: a network on a device, from given
//! weights and optimizer state, fitted for a number of epochs. What a
//! local run ([`super::train`]) and a federated round share: preparation
//! and finalisation (normalisation, thresholds, the package) stay outside.
//!
//! Epoch `e` shuffles and augments from (seed, e) alone, and the learning
//! rate follows (base, e), so fitting epochs 1..=2 equals fitting epoch 1,
//! handing over weights and optimizer state, then fitting epoch 2.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::data::{Augmentation, Example};
use super::objective::{self, ClassWeights};
use super::optimizer::{AdamW, AdamWConfig};
use super::{TrainError, batch, cosine_learning_rate, decays, trainable};
use crate::model::ExamNet;
use crate::model::package::ModelManifest;
use crate::rng::Pcg;

/// How epochs are fitted.
#[derive(Debug, Clone, Copy)]
pub struct FitSettings {
    /// Cases per optimizer step.
    pub batch_size: usize,
    /// AdamW settings (its learning rate is the base of the schedule).
    pub optimizer: AdamWConfig,
    /// Epochs over which the learning rate decays (cosine) to a tenth.
    pub decay_epochs: usize,
    /// Image augmentation.
    pub augmentation: Augmentation,
    /// Seed of the order of cases and the augmentation.
    pub seed: u64,
}

/// One fitted epoch.
#[derive(Debug, Clone, Copy)]
pub struct EpochFit {
    /// 1-based epoch.
    pub epoch: usize,
    /// Mean training loss over its steps.
    pub train_loss: f64,
    /// Training cases per second.
    pub cases_per_second: f64,
}

/// A network, its variables and its AdamW state, on one device.
pub struct Trainer {
    varmap: VarMap,
    net: ExamNet,
    optimizer: AdamW,
    manifest: ModelManifest,
    settings: FitSettings,
    device: Device,
    proximal: Option<Proximal>,
}

/// FedProx's proximal term μ/2·‖w − w_g‖² over the trainable variables.
struct Proximal {
    mu: f64,
    anchors: Vec<(candle_core::Var, Tensor)>,
}

impl Trainer {
    /// A freshly initialised network of `manifest`'s architecture on
    /// `device`, with a fresh optimizer; load weights next
    /// ([`Trainer::load_weights`], [`Trainer::set_weights`]).
    ///
    /// # Errors
    /// On tensor errors.
    pub fn new(
        manifest: &ModelManifest,
        settings: FitSettings,
        device: &Device,
    ) -> Result<Self, TrainError> {
        if device.is_cpu() {
            super::reuse_freed_memory();
        }
        let varmap = VarMap::new();
        let net = ExamNet::new(
            &manifest.architecture,
            manifest.emr.len(),
            VarBuilder::from_varmap(&varmap, DType::F32, device),
        )?;
        let optimizer = AdamW::new(trainable(&varmap)?, settings.optimizer, decays)?;
        Ok(Self {
            varmap,
            net,
            optimizer,
            manifest: manifest.clone(),
            settings,
            device: device.clone(),
            proximal: None,
        })
    }

    /// Adds FedProx's proximal term μ/2·‖w − w_g‖² (over the trainable
    /// variables; `anchor` = w_g, by name) to the loss of every step from
    /// now on; `mu = 0` removes it.
    ///
    /// # Errors
    /// [`TrainError::Internal`] when `anchor` lacks a trainable variable;
    /// tensor errors.
    pub fn set_proximal(
        &mut self,
        mu: f64,
        anchor: &HashMap<String, Tensor>,
    ) -> Result<(), TrainError> {
        if mu <= 0.0 {
            self.proximal = None;
            return Ok(());
        }
        let anchors = trainable(&self.varmap)?
            .into_iter()
            .map(|(name, var)| {
                let value = anchor
                    .get(&name)
                    .ok_or_else(|| TrainError::Internal(format!("no anchor for {name}")))?
                    .to_device(&self.device)?
                    .detach();
                Ok((var, value))
            })
            .collect::<Result<_, TrainError>>()?;
        self.proximal = Some(Proximal { mu, anchors });
        Ok(())
    }

    /// The network.
    pub fn net(&self) -> &ExamNet {
        &self.net
    }

    /// Its variables (weights and batch-norm statistics).
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    /// The manifest the batches are encoded with.
    pub fn manifest(&self) -> &ModelManifest {
        &self.manifest
    }

    /// The device it trains on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Loads every variable from a safetensors file (a package's weights).
    ///
    /// # Errors
    /// When the file lacks a variable or a shape differs.
    pub fn load_weights(&mut self, path: &Path) -> Result<(), TrainError> {
        Ok(self.varmap.load(path)?)
    }

    /// Sets every variable from `weights` (by name, onto this device).
    ///
    /// # Errors
    /// [`TrainError::Internal`] when a variable is missing; tensor errors
    /// when a shape differs.
    pub fn set_weights(&mut self, weights: &HashMap<String, Tensor>) -> Result<(), TrainError> {
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| TrainError::Internal("weights lock poisoned".to_owned()))?;
        for (name, var) in data.iter() {
            let value = weights
                .get(name)
                .ok_or_else(|| TrainError::Internal(format!("no weights for {name}")))?;
            var.set(&value.to_device(&self.device)?)?;
        }
        Ok(())
    }

    /// A copy of every variable, by name.
    ///
    /// # Errors
    /// [`TrainError::Internal`] when the weights lock is poisoned.
    pub fn weights(&self) -> Result<HashMap<String, Tensor>, TrainError> {
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| TrainError::Internal("weights lock poisoned".to_owned()))?;
        data.iter()
            .map(|(name, var)| Ok((name.clone(), var.as_tensor().copy()?)))
            .collect()
    }

    /// Restores the optimizer's moments (written by [`AdamW::save`]) and
    /// its step count.
    ///
    /// # Errors
    /// When the state does not fit these variables.
    pub fn load_optimizer(&mut self, path: &Path, steps: u64) -> Result<(), TrainError> {
        Ok(self.optimizer.load(path, steps)?)
    }

    /// Fits epochs `first..first + epochs` (1-based numbers: they select
    /// the learning rate, the order and the augmentation), continuing from
    /// the current weights and optimizer state; `on_epoch` after each.
    ///
    /// # Errors
    /// On tensor errors.
    pub fn fit(
        &mut self,
        first: usize,
        epochs: usize,
        cases: &[Example],
        class_weights: &ClassWeights,
        on_step: &(dyn Fn(usize, f64) + Sync),
    ) -> Result<Vec<EpochFit>, TrainError> {
        (first..first + epochs)
            .map(|epoch| self.fit_epoch(epoch, cases, class_weights, on_step))
            .collect()
    }

    /// Fits epoch `epoch` (1-based) on `cases`; `on_step(epoch, running
    /// mean loss)` after each optimizer step.
    ///
    /// # Errors
    /// On tensor errors.
    pub fn fit_epoch(
        &mut self,
        epoch: usize,
        cases: &[Example],
        class_weights: &ClassWeights,
        on_step: &(dyn Fn(usize, f64) + Sync),
    ) -> Result<EpochFit, TrainError> {
        let s = self.settings;
        self.optimizer.set_learning_rate(cosine_learning_rate(
            s.optimizer.learning_rate,
            epoch,
            s.decay_epochs,
        ));
        let started = Instant::now();
        let mut order: Vec<usize> = (0..cases.len()).collect();
        let mut shuffle = Pcg::new(s.seed, 0x5348_5546_0000_0000 | epoch as u64);
        for i in (1..order.len()).rev() {
            order.swap(i, shuffle.below(i + 1));
        }
        let (mut running, mut steps) = (0.0, 0usize);
        for chunk in order.chunks(s.batch_size) {
            // A lone last case would give batch norm a batch of one.
            if chunk.len() < 2 {
                continue;
            }
            let chunk: Vec<(usize, &Example)> = chunk.iter().map(|&i| (i, &cases[i])).collect();
            let b = batch(
                &chunk,
                &self.manifest,
                class_weights,
                Some((&s.augmentation, s.seed, epoch)),
                &self.device,
            )?;
            let logits = self
                .net
                .forward(b.image.as_ref(), &b.values, &b.missing, true)?;
            let mut loss = objective::ordinal_loss(&logits, &b.targets, &b.weights)?;
            if let Some(proximal) = &self.proximal {
                let mut sum = Tensor::zeros((), DType::F32, &self.device)?;
                for (var, anchor) in &proximal.anchors {
                    sum = (sum + var.as_tensor().sub(anchor)?.sqr()?.sum_all()?)?;
                }
                loss = (loss + (sum * (proximal.mu / 2.0))?)?;
            }
            self.optimizer.step(&loss.backward()?)?;
            running += f64::from(loss.to_scalar::<f32>()?);
            steps += 1;
            on_step(epoch, running / steps as f64);
        }
        Ok(EpochFit {
            epoch,
            train_loss: running / steps.max(1) as f64,
            cases_per_second: cases.len() as f64 / started.elapsed().as_secs_f64(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Backbone, default_manifest};
    use crate::train::objective::ClassWeighting;

    fn examples(size: usize, n: usize) -> Vec<Example> {
        let mut rng = Pcg::new(7, 7);
        (0..n)
            .map(|i| Example {
                image: Some((0..size * size).map(|_| rng.uniform() as f32).collect()),
                features: vec![("spo2_pct".to_owned(), Some(85.0 + i as f64))],
                levels: [(i % 5) as u8, ((i + 2) % 5) as u8],
            })
            .collect()
    }

    fn setup() -> (ModelManifest, FitSettings, Vec<Example>, ClassWeights) {
        let manifest = default_manifest("t", super::super::architecture(Backbone::Tiny), 32);
        let settings = FitSettings {
            batch_size: 4,
            optimizer: AdamWConfig::default(),
            decay_epochs: 5,
            augmentation: Augmentation::default(),
            seed: 3,
        };
        let cases = examples(32, 10);
        let weights = objective::class_weights(
            &cases.iter().map(|e| e.levels).collect::<Vec<_>>(),
            ClassWeighting::Sqrt,
        );
        (manifest, settings, cases, weights)
    }

    fn same(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> bool {
        a.len() == b.len()
            && a.iter().all(|(name, t)| {
                b.get(name).is_some_and(|u| {
                    t.flatten_all().and_then(|t| t.to_vec1::<f32>()).ok()
                        == u.flatten_all().and_then(|u| u.to_vec1::<f32>()).ok()
                })
            })
    }

    #[test]
    fn the_trainer_continues_from_given_weights_and_optimizer_state() {
        let (manifest, settings, cases, class_weights) = setup();
        let quiet = |_: usize, _: f64| {};
        // Given weights W (not the fresh initialisation of a new trainer).
        let mut source = Trainer::new(&manifest, settings, &Device::Cpu).expect("trainer");
        source
            .fit(1, 1, &cases, &class_weights, &quiet)
            .expect("fit");
        let w = source.weights().expect("weights");

        // Zero epochs from W: W.
        let mut zero = Trainer::new(&manifest, settings, &Device::Cpu).expect("trainer");
        assert!(!same(&zero.weights().expect("weights"), &w), "fresh ≠ W");
        zero.set_weights(&w).expect("set");
        assert!(
            zero.fit(1, 0, &cases, &class_weights, &quiet)
                .expect("fit")
                .is_empty()
        );
        assert!(same(&zero.weights().expect("weights"), &w));

        // Two epochs from W at once …
        let mut straight = Trainer::new(&manifest, settings, &Device::Cpu).expect("trainer");
        straight.set_weights(&w).expect("set");
        let fits = straight
            .fit(1, 2, &cases, &class_weights, &quiet)
            .expect("fit");
        assert_eq!(fits.iter().map(|f| f.epoch).collect::<Vec<_>>(), [1, 2]);
        let two = straight.weights().expect("weights");
        assert!(!same(&two, &w), "training moved the weights");

        // … equal one epoch, then one more from its weights and optimizer
        // state handed to another trainer.
        let mut first = Trainer::new(&manifest, settings, &Device::Cpu).expect("trainer");
        first.set_weights(&w).expect("set");
        first
            .fit(1, 1, &cases, &class_weights, &quiet)
            .expect("fit");
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("optimizer.safetensors");
        first.optimizer().save(&state).expect("save");
        let mut second = Trainer::new(&manifest, settings, &Device::Cpu).expect("trainer");
        second
            .set_weights(&first.weights().expect("weights"))
            .expect("set");
        second
            .load_optimizer(&state, first.optimizer().steps())
            .expect("load");
        second
            .fit(2, 1, &cases, &class_weights, &quiet)
            .expect("fit");
        assert!(same(&second.weights().expect("weights"), &two));
    }

    /// Squared distance of `a` from `b` over the trainable variables.
    fn distance(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> f64 {
        a.iter()
            .filter(|(name, _)| !name.ends_with("running_mean") && !name.ends_with("running_var"))
            .map(|(name, t)| {
                let d = (t - &b[name])
                    .and_then(|d| d.sqr())
                    .and_then(|d| d.sum_all());
                f64::from(d.and_then(|d| d.to_scalar::<f32>()).expect("distance"))
            })
            .sum()
    }

    #[test]
    fn the_proximal_term_keeps_the_weights_near_the_anchor() {
        let (manifest, settings, cases, class_weights) = setup();
        let quiet = |_: usize, _: f64| {};
        let anchor = Trainer::new(&manifest, settings, &Device::Cpu)
            .expect("trainer")
            .weights()
            .expect("weights");
        let moved = |mu: f64| {
            let mut trainer = Trainer::new(&manifest, settings, &Device::Cpu).expect("trainer");
            trainer.set_weights(&anchor).expect("set");
            trainer.set_proximal(mu, &anchor).expect("proximal");
            trainer
                .fit(1, 2, &cases, &class_weights, &quiet)
                .expect("fit");
            distance(&trainer.weights().expect("weights"), &anchor)
        };
        let (free, held) = (moved(0.0), moved(100.0));
        assert!(free > 0.0, "training moved the weights");
        assert!(held < free * 0.9, "μ = 100: {held} vs μ = 0: {free}");
    }
}

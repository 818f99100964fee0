//! Training data: every case of every site prepared once through that
//! site's plugins (`Pipeline::prepare`, the inference path), split into
//! training and validation by a hash of (seed, site, case id), the EMR
//! normalisation fitted on the training split, and image augmentation.

use std::sync::Arc;

use crate::config::Config;
use crate::dataset::Site;
use crate::model::net::HORIZONS;
use crate::model::package::EmrFeature;
use crate::pipeline::Pipeline;
use crate::plugins::PluginSet;
use crate::rng::Pcg;

/// One prepared, labelled case.
#[derive(Debug, Clone)]
pub struct Example {
    /// The canonical S×S image (none for EMR-only models).
    pub image: Option<Vec<f32>>,
    /// Canonical features, as the site plugin mapped them.
    pub features: Vec<(String, Option<f64>)>,
    /// Oxygen levels at 24 h and 72 h.
    pub levels: [u8; HORIZONS],
}

/// A site's cases, prepared; refused cases as `case id: reason`.
pub struct PreparedSite {
    /// Prepared cases, each with whether it is in the validation split.
    pub examples: Vec<(Example, bool)>,
    /// Cases the pipeline refused.
    pub refused: Vec<String>,
}

/// Whether a case belongs to the validation split: a stable hash of (seed,
/// site, case id), so the split does not depend on file order or on which
/// other cases exist.
pub fn in_validation(seed: u64, site: &str, case_id: &str, fraction: f64) -> bool {
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        format!("oxbox-split/{seed}/{site}/{case_id}").as_bytes(),
    );
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest.as_ref()[..8]);
    let unit = (u64::from_le_bytes(head) >> 11) as f64 / (1u64 << 53) as f64;
    unit < fraction
}

/// Prepares every case of `site` in parallel through its plugins
/// ([`crate::cases::prepare_cases`]), labels it and assigns its split;
/// `progress` is called once per case.
pub fn prepare_site(
    site: &Site,
    pipeline: &Pipeline,
    plugins: &Arc<PluginSet>,
    config: &Config,
    split: (u64, f64),
    progress: &(dyn Fn() + Sync),
) -> PreparedSite {
    let inputs = crate::cases::prepare_cases(site, pipeline, plugins, &config.limits, progress);
    let results = inputs.into_iter().zip(&site.cases).map(|(input, case)| {
        input.map(|input| {
            let example = Example {
                image: input.image,
                features: input.features,
                levels: [case.level_24h, case.level_72h],
            };
            let validation = in_validation(split.0, &site.id, &case.case_id, split.1);
            (example, validation)
        })
    });
    let mut prepared = PreparedSite {
        examples: Vec::new(),
        refused: Vec::new(),
    };
    for result in results {
        match result {
            Ok(example) => prepared.examples.push(example),
            Err(reason) => prepared.refused.push(reason),
        }
    }
    prepared
}

/// Fits each feature's normalisation on the training split: mean and
/// standard deviation of its present values, of ln(1 + value) for
/// non-negative, right-skewed measurements (sample skewness > 1: the
/// inflammatory markers; never codes such as the oxygen device).
/// Features with fewer than two values keep their defaults.
pub fn fit_normalisation(emr: &mut [EmrFeature], examples: &[&Example]) {
    for spec in emr.iter_mut() {
        let values: Vec<f64> = examples
            .iter()
            .filter_map(|e| {
                e.features
                    .iter()
                    .find(|(n, _)| *n == spec.name)
                    .and_then(|(_, v)| *v)
            })
            .filter(|v| v.is_finite())
            .map(|v| v.clamp(spec.min, spec.max))
            .collect();
        if values.len() < 2 {
            continue;
        }
        let (mean, std) = mean_std(&values);
        let skewness = if std > 0.0 {
            values
                .iter()
                .map(|v| ((v - mean) / std).powi(3))
                .sum::<f64>()
                / values.len() as f64
        } else {
            0.0
        };
        let is_code = oxbox_emr_schema::feature(&spec.name).is_some_and(|f| f.integer);
        spec.log = !is_code && spec.min >= 0.0 && skewness > 1.0;
        let (mean, std) = if spec.log {
            mean_std(&values.iter().map(|v| v.ln_1p()).collect::<Vec<_>>())
        } else {
            (mean, std)
        };
        spec.mean = mean;
        spec.std = if std > 1e-6 { std } else { 1.0 };
    }
}

fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

/// How training images are perturbed: each epoch every image is rotated,
/// shifted and has its contrast and brightness jittered, uniformly within
/// these bounds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Augmentation {
    /// Largest rotation, degrees.
    pub rotation_degrees: f64,
    /// Largest shift, fraction of the side.
    pub translation: f64,
    /// Largest relative contrast change.
    pub contrast: f64,
    /// Largest brightness change (images are in [0, 1]).
    pub brightness: f64,
}

impl Default for Augmentation {
    fn default() -> Self {
        Self {
            rotation_degrees: 7.0,
            translation: 0.04,
            contrast: 0.1,
            brightness: 0.05,
        }
    }
}

impl Augmentation {
    /// The augmented copy of a square `size`×`size` image: bilinear
    /// resampling under a rotation about the centre and a shift (outside
    /// the image reads 0), then contrast about 0.5 and brightness, clamped
    /// to [0, 1].
    pub fn apply(&self, image: &[f32], size: usize, rng: &mut Pcg) -> Vec<f32> {
        let angle = rng
            .range(-self.rotation_degrees, self.rotation_degrees)
            .to_radians();
        let shift = self.translation * size as f64;
        let (tx, ty) = (rng.range(-shift, shift), rng.range(-shift, shift));
        let contrast = 1.0 + rng.range(-self.contrast, self.contrast);
        let brightness = rng.range(-self.brightness, self.brightness);
        let (sin, cos) = angle.sin_cos();
        let centre = (size as f64 - 1.0) / 2.0;
        let last = (size - 1) as f64;
        let pixel = |x: usize, y: usize| f64::from(image[y * size + x]);
        let mut out = vec![0f32; size * size];
        for (y, row) in out.chunks_exact_mut(size).enumerate() {
            for (x, value) in row.iter_mut().enumerate() {
                // Where this output pixel comes from: the inverse transform.
                let (dx, dy) = (x as f64 - centre - tx, y as f64 - centre - ty);
                let sx = cos * dx + sin * dy + centre;
                let sy = -sin * dx + cos * dy + centre;
                let v = if (0.0..=last).contains(&sx) && (0.0..=last).contains(&sy) {
                    let (x0, y0) = (sx.floor() as usize, sy.floor() as usize);
                    let (x1, y1) = ((x0 + 1).min(size - 1), (y0 + 1).min(size - 1));
                    let (fx, fy) = (sx - x0 as f64, sy - y0 as f64);
                    (pixel(x0, y0) * (1.0 - fx) + pixel(x1, y0) * fx) * (1.0 - fy)
                        + (pixel(x0, y1) * (1.0 - fx) + pixel(x1, y1) * fx) * fy
                } else {
                    0.0
                };
                *value = ((v - 0.5) * contrast + 0.5 + brightness).clamp(0.0, 1.0) as f32;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_stable_and_near_the_fraction() {
        let chosen = (0..4000)
            .filter(|i| in_validation(7, "site-1", &format!("case-{i:05}"), 0.15))
            .count();
        assert!((520..680).contains(&chosen), "{chosen}");
        assert_eq!(
            in_validation(7, "site-1", "case-00001", 0.15),
            in_validation(7, "site-1", "case-00001", 0.15)
        );
        let other_seed = (0..4000)
            .filter(|i| {
                in_validation(7, "site-1", &format!("case-{i:05}"), 0.15)
                    != in_validation(8, "site-1", &format!("case-{i:05}"), 0.15)
            })
            .count();
        assert!(other_seed > 300, "another seed, another split");
    }

    #[test]
    fn identity_augmentation_keeps_the_image_and_shifts_move_it() {
        let size = 16;
        let image: Vec<f32> = (0..size * size).map(|i| (i % 7) as f32 / 7.0).collect();
        let none = Augmentation {
            rotation_degrees: 0.0,
            translation: 0.0,
            contrast: 0.0,
            brightness: 0.0,
        };
        let same = none.apply(&image, size, &mut Pcg::new(1, 1));
        for (a, b) in image.iter().zip(&same) {
            assert!((a - b).abs() < 1e-6);
        }
        let augmented = Augmentation::default().apply(&image, size, &mut Pcg::new(1, 1));
        assert_ne!(augmented, image);
        assert!(augmented.iter().all(|v| (0.0..=1.0).contains(v)));
        // Same generator state, same result.
        assert_eq!(
            augmented,
            Augmentation::default().apply(&image, size, &mut Pcg::new(1, 1))
        );
    }

    #[test]
    fn skewed_positive_labs_are_log_normalised() {
        let examples: Vec<Example> = (0..500)
            .map(|i| {
                let x = f64::from(i) / 100.0 - 2.5;
                Example {
                    image: None,
                    features: vec![
                        ("crp_mg_l".to_owned(), Some((3.0 + x).exp())),
                        ("spo2_pct".to_owned(), Some(94.0 + x)),
                    ],
                    levels: [0, 0],
                }
            })
            .collect();
        let refs: Vec<&Example> = examples.iter().collect();
        let mut emr: Vec<EmrFeature> = ["crp_mg_l", "spo2_pct", "ldh_u_l"]
            .iter()
            .map(|name| {
                let f = oxbox_emr_schema::feature(name).expect("schema");
                EmrFeature {
                    name: (*name).to_owned(),
                    unit: f.unit.to_owned(),
                    min: f.min,
                    max: f.max,
                    mean: 0.0,
                    std: 1.0,
                    log: false,
                }
            })
            .collect();
        fit_normalisation(&mut emr, &refs);
        assert!(emr[0].log, "CRP is right-skewed");
        assert!((3.0..3.2).contains(&emr[0].mean), "{}", emr[0].mean);
        assert!(!emr[1].log);
        assert!((emr[1].mean - 94.0).abs() < 0.01);
        assert_eq!(
            (emr[2].mean, emr[2].std),
            (0.0, 1.0),
            "no values: unchanged"
        );
    }
}

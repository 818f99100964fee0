//! A synthetic PA chest radiograph: body outline, lung fields, mediastinum
//! and heart, diaphragm domes, ribs and spine, with patchy opacities whose
//! number, size, density and laterality follow the latent severity. The
//! result is an attenuation map in [0, 1] (1 = most attenuating, bright on
//! a MONOCHROME2 display).

use rayon::prelude::*;

use oxbox_rng::Pcg;

/// A Gaussian opacity in normalised image coordinates.
#[derive(Debug, Clone, Copy)]
struct Opacity {
    x: f64,
    y: f64,
    radius: f64,
    density: f64,
}

/// A lung field: an ellipse cut below by a diaphragm dome.
#[derive(Debug, Clone, Copy)]
struct Lung {
    cx: f64,
    cy: f64,
    rx: f64,
    ry: f64,
}

impl Lung {
    fn contains(&self, x: f64, y: f64) -> bool {
        let (dx, dy) = ((x - self.cx) / self.rx, (y - self.cy) / self.ry);
        dx * dx + dy * dy < 1.0 && y < self.dome(x)
    }

    /// The diaphragm below this lung: highest mid-lung.
    fn dome(&self, x: f64) -> f64 {
        let dx = (x - self.cx) / self.rx;
        self.cy + 0.55 * self.ry + 0.25 * self.ry * dx * dx
    }

    /// A random point in the lung's lower two thirds, biased outward.
    fn sample(&self, rng: &mut Pcg) -> (f64, f64) {
        loop {
            let x = self.cx + self.rx * rng.range(-0.85, 0.85);
            let y = self.cy + self.ry * rng.range(-0.3, 0.6);
            if self.contains(x, y) {
                return (x, y);
            }
        }
    }
}

/// What varies between patients' images.
#[derive(Debug, Clone, Copy)]
pub struct ThoraxParams {
    /// Latent severity (drives the opacities).
    pub severity: f64,
    /// Heel-effect gradient strength (site).
    pub heel: f64,
}

/// Renders a `width` × `height` attenuation map (row-major).
pub fn render(width: usize, height: usize, params: ThoraxParams, rng: &mut Pcg) -> Vec<f32> {
    // Patient-to-patient anatomy.
    let scale = rng.range(0.94, 1.06);
    let shift = rng.range(-0.02, 0.02);
    let lungs = [
        Lung {
            cx: 0.31 + shift,
            cy: 0.45,
            rx: 0.15 * scale,
            ry: 0.30 * scale,
        },
        Lung {
            cx: 0.69 + shift,
            cy: 0.46,
            rx: 0.14 * scale,
            ry: 0.28 * scale,
        },
    ];
    let heart = (0.56 + shift, 0.63, 0.13 * scale, 0.11 * scale);

    // Opacities: more, larger and denser with severity; bilateral when
    // severe, one-sided (either side) when mild.
    let extent = 1.0 / (1.0 + (-1.4 * (params.severity - 0.4)).exp());
    let count = 1 + (5.0 * extent).round() as usize;
    let bilateral = params.severity > 0.3 || rng.chance(0.3);
    let side = rng.below(2);
    let mut opacities = Vec::with_capacity(count * 2);
    for i in 0..count * if bilateral { 2 } else { 1 } {
        let lung = if bilateral { lungs[i % 2] } else { lungs[side] };
        let (x, y) = lung.sample(rng);
        opacities.push(Opacity {
            x,
            y,
            radius: (0.025 + 0.07 * extent) * rng.range(0.7, 1.3),
            density: (0.06 + 0.32 * extent) * rng.range(0.7, 1.2),
        });
    }
    let noise_seed = rng.next_u64();
    let (w, h) = (width as f64, height as f64);
    let mut image = vec![0f32; width * height];
    image
        .par_chunks_mut(width)
        .enumerate()
        .for_each(|(row, out)| {
            let mut noise = Pcg::new(noise_seed, row as u64);
            let y = (row as f64 + 0.5) / h;
            let heel = 1.0 + params.heel * (y - 0.5);
            for (col, v) in out.iter_mut().enumerate() {
                let x = (col as f64 + 0.5) / w;
                let (bx, by) = ((x - 0.5) / 0.46, (y - 0.55) / 0.56);
                let mut a = if bx * bx + by * by < 1.0 { 0.5 } else { 0.04 };
                let in_lung = lungs.iter().find(|l| l.contains(x, y));
                if let Some(lung) = in_lung {
                    a = 0.18;
                    for o in &opacities {
                        let d2 = (x - o.x).powi(2) + (y - o.y).powi(2);
                        let r2 = o.radius * o.radius;
                        if d2 < 9.0 * r2 {
                            a += o.density * (-d2 / (2.0 * r2)).exp();
                        }
                    }
                    // Ribs: curved bands across each lung.
                    let phase = (y - 0.1 - 0.09 * ((x - lung.cx) / lung.rx).powi(2)) / 0.062;
                    if phase.fract() < 0.24 {
                        a += 0.09;
                    }
                } else if y > 0.5
                    && y < 0.98
                    && lungs
                        .iter()
                        .any(|l| (x - l.cx).abs() < l.rx && y >= l.dome(x))
                {
                    a = 0.66; // below the diaphragm
                }
                let (hx, hy) = ((x - heart.0) / heart.2, (y - heart.1) / heart.3);
                if hx * hx + hy * hy < 1.0 {
                    a = a.max(0.8);
                } else if (x - 0.5 - shift).abs() < 0.065 && y > 0.08 && y < 0.75 {
                    a = a.max(0.72); // mediastinum
                }
                if (x - 0.5 - shift).abs() < 0.03 && y > 0.05 {
                    a += 0.08; // spine
                }
                let grain = (noise.uniform() + noise.uniform() - 1.0) * 0.02;
                *v = ((a * heel) + grain).clamp(0.0, 1.0) as f32;
            }
        });
    image
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lung_mean(image: &[f32], width: usize, height: usize) -> f64 {
        // A box inside both lungs' lower halves.
        let mut sum = 0.0;
        let mut n = 0;
        for row in (height * 45 / 100)..(height * 60 / 100) {
            for col in (width * 22 / 100)..(width * 38 / 100) {
                sum += f64::from(image[row * width + col]);
                n += 1;
            }
            for col in (width * 62 / 100)..(width * 76 / 100) {
                sum += f64::from(image[row * width + col]);
                n += 1;
            }
        }
        sum / f64::from(n)
    }

    #[test]
    fn severe_lungs_are_denser_and_rendering_is_deterministic() {
        let render_at = |severity: f64, seed: u64| {
            let params = ThoraxParams {
                severity,
                heel: 0.05,
            };
            render(256, 256, params, &mut Pcg::new(seed, 0))
        };
        assert_eq!(render_at(1.0, 3), render_at(1.0, 3));
        let mild: f64 = (0..8)
            .map(|s| lung_mean(&render_at(-1.5, s), 256, 256))
            .sum();
        let severe: f64 = (0..8)
            .map(|s| lung_mean(&render_at(2.5, s), 256, 256))
            .sum();
        assert!(severe > mild + 0.3, "mild {mild}, severe {severe}");
    }
}

//! Per-layer timings of the image branch's convolutions on the CPU, for
//! `oxbox bench --layers`: which convolutions dominate a forward pass, and
//! what each kernel path (im2col + gemm, Winograd) costs on this machine.

use std::time::Instant;

use serde::Serialize;

use super::cpu_batch_norm::MaxPool3x3Stride2;
use super::cpu_conv::FusedConv;
use super::package::Backbone;
use super::stem_pool::StemPool;
use super::winograd::{Tile, Winograd};

/// One convolution of the backbone, timed.
#[derive(Debug, Clone, Serialize)]
pub struct LayerTiming {
    /// Where it sits: `stem`, `layer2.0.a`, `layer3.1.shortcut`, ….
    pub layer: String,
    /// Input channels, output channels, kernel side, stride.
    pub shape: [usize; 4],
    /// Input side (square planes).
    pub input_side: usize,
    /// Multiply-adds of a direct convolution, millions, for the batch.
    pub mmacs: f64,
    /// Median milliseconds with im2col only (at batch 1 with weights packed
    /// once: `packed_gemm`, or `narrow_gemm` for small planes on AVX-512 and AVX2).
    pub im2col_ms: f64,
    /// Fastest run with im2col only, milliseconds.
    pub im2col_min_ms: f64,
    /// Median milliseconds with the input read in place
    /// ([`FusedConv::run_in_place`]: `narrow_gemm`'s panels, at batch 1 on
    /// AVX-512 and AVX2), whatever the plane size; `None` where that path
    /// does not run.
    pub in_place_ms: Option<f64>,
    /// Median milliseconds with im2col + `gemm` and no Winograd (the
    /// kernel before packed weights and Winograd).
    pub gemm_ms: f64,
    /// Median milliseconds of the path the network runs.
    pub chosen_ms: f64,
    /// Fastest run of the path the network runs, milliseconds.
    pub chosen_min_ms: f64,
    /// The path the network runs: `im2col`, `winograd4` (F(4×4, 3×3)) or
    /// `winograd2` (F(2×2, 3×3)).
    pub chosen: &'static str,
    /// Median milliseconds in the Winograd domain with 4×4 tiles, for the
    /// 3×3 stride-1 convolutions (whichever path the network runs).
    pub winograd4_ms: Option<f64>,
    /// The same with 2×2 tiles.
    pub winograd2_ms: Option<f64>,
    /// For the stem: median milliseconds of the 3×3 stride-2 max pool
    /// that follows it, run on its own (the network ran the chosen path,
    /// then this, before the fused kernel).
    pub pool_ms: Option<f64>,
    /// For the stem, on AVX2 and AVX-512: median milliseconds of the
    /// convolution and the pool as one kernel ([`StemPool`]), what the
    /// network runs instead of both.
    pub stem_pool_ms: Option<f64>,
}

/// The convolutions of `backbone` at input side `size`: (name, (in, out,
/// kernel, stride), input side), in forward order, as `net::ImageBranch`
/// builds them.
pub fn layers(backbone: Backbone, size: usize) -> Vec<(String, [usize; 4], usize)> {
    let (widths, depths): ([usize; 4], [usize; 4]) = match backbone {
        Backbone::Tiny => ([8, 16, 32, 64], [1, 1, 1, 1]),
        Backbone::Resnet18 => ([64, 128, 256, 512], [2, 2, 2, 2]),
        Backbone::Resnet34 => ([64, 128, 256, 512], [3, 4, 6, 3]),
    };
    let out = |side: usize, k: usize, s: usize| (side + 2 * (k / 2) - k) / s + 1;
    let mut list = vec![("stem".to_string(), [1, widths[0], 7, 2], size)];
    // Stem, then the 3×3 stride-2 max pool.
    let mut side = (out(size, 7, 2) + 2 - 3) / 2 + 1;
    let mut cin = widths[0];
    for (stage, (&cout, &depth)) in widths.iter().zip(&depths).enumerate() {
        for i in 0..depth {
            let stride = if stage > 0 && i == 0 { 2 } else { 1 };
            let name = format!("layer{}.{i}", stage + 1);
            list.push((format!("{name}.a"), [cin, cout, 3, stride], side));
            if stride != 1 || cin != cout {
                list.push((format!("{name}.shortcut"), [cin, cout, 1, stride], side));
            }
            let next = out(side, 3, stride);
            list.push((format!("{name}.b"), [cout, cout, 3, 1], next));
            side = next;
            cin = cout;
        }
    }
    list
}

/// (median, minimum) of `ms`.
fn median_and_min(mut ms: Vec<f64>) -> (f64, f64) {
    ms.sort_by(f64::total_cmp);
    let mid = ms.len() / 2;
    let median = if ms.len() % 2 == 1 {
        ms[mid]
    } else {
        (ms[mid - 1] + ms[mid]) / 2.0
    };
    (median, ms[0])
}

/// (median, minimum) milliseconds of `runs` calls of `run` (at least
/// one), after one untimed call that warms caches and lazy state.
fn timed(runs: usize, mut run: impl FnMut()) -> (f64, f64) {
    run();
    let ms = (0..runs.max(1))
        .map(|_| {
            let t = Instant::now();
            run();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    median_and_min(ms)
}

/// Times every convolution of `backbone` at input side `size` on `batch`
/// images of pseudo-random values, `runs` times per path (after a warm-up
/// run), on the current rayon pool.
///
/// # Errors
/// When a layer's shape does not make a kernel (a too-small `size`).
pub fn time_layers(
    backbone: Backbone,
    size: usize,
    batch: usize,
    runs: usize,
) -> candle_core::Result<Vec<LayerTiming>> {
    let values = |count: usize, seed: usize| -> Vec<f32> {
        (0..count)
            .map(|i| {
                (i.wrapping_mul(2_654_435_761).wrapping_add(seed) % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    };
    let mut timings = Vec::new();
    for (layer, [cin, cout, k, stride], side) in layers(backbone, size) {
        let weights: Vec<f32> = values(cout * cin * k * k, 1)
            .into_iter()
            .map(|w| w * 0.05)
            .collect();
        let bias = values(cout, 2);
        let kernel = FusedConv::new(
            weights.clone(),
            bias.clone(),
            (cout, cin, k),
            stride,
            k / 2,
            true,
        )?;
        let out_side = kernel.out_side(side)?;
        let input = values(batch * cin * side * side, 3);
        let dims = [batch, side, side, out_side, out_side];
        let time = |kernel: &FusedConv| {
            timed(runs, || {
                std::hint::black_box(kernel.run(&input, dims, None));
            })
        };
        let tile = kernel.winograd_tile(batch, side, side);
        let winograd = tile.is_some();
        let chosen = time(&kernel);
        let round = |v: f64| (v * 1000.0).round() / 1000.0;
        // Each Winograd form on its own (same weights, bias and ReLU).
        let form = |tile: Tile| -> Option<f64> {
            (k == 3 && stride == 1).then(|| {
                let form = Winograd::new(tile, &weights, &bias, (cout, cin), true);
                let (median, _) = timed(runs, || {
                    std::hint::black_box(form.run(&input, [batch, side, side], None));
                });
                round(median)
            })
        };
        let im2col = if winograd {
            time(&kernel.clone().without_winograd())
        } else {
            chosen
        };
        let gemm = time(&kernel.clone().plain_gemm());
        let in_place = kernel.run_in_place(&input, dims).map(|_| {
            let (median, _) = timed(runs, || {
                std::hint::black_box(kernel.run_in_place(&input, dims));
            });
            (median * 1000.0).round() / 1000.0
        });
        // The stem's pool on the convolution's output, and both as one
        // kernel.
        let stem_pool = kernel.stem_pool();
        let pool_ms = match &stem_pool {
            Some(_) => {
                let conv = kernel.run(&input, dims, None);
                let pool = MaxPool3x3Stride2 { padding: 1 };
                let planes = [batch * cout, out_side, out_side];
                // Its errors (a plane too small) once, before timing.
                pool.run(&conv, planes)?;
                let (median, _) = timed(runs, || {
                    std::hint::black_box(pool.run(&conv, planes).map(|(y, _)| y.len()).ok());
                });
                Some(round(median))
            }
            None => None,
        };
        let stem_pool_ms = stem_pool.filter(|_| StemPool::available()).map(|stem| {
            let (median, _) = timed(runs, || {
                std::hint::black_box(stem.run(&input, [batch, side, side]));
            });
            round(median)
        });
        timings.push(LayerTiming {
            layer,
            shape: [cin, cout, k, stride],
            input_side: side,
            mmacs: round((batch * cout * cin * k * k * out_side * out_side) as f64 / 1e6),
            im2col_ms: round(im2col.0),
            im2col_min_ms: round(im2col.1),
            in_place_ms: in_place,
            gemm_ms: round(gemm.0),
            chosen_ms: round(chosen.0),
            chosen_min_ms: round(chosen.1),
            chosen: match tile {
                Some(Tile::Four) => "winograd4",
                Some(Tile::Two) => "winograd2",
                None => "im2col",
            },
            winograd4_ms: form(Tile::Four),
            winograd2_ms: form(Tile::Two),
            pool_ms,
            stem_pool_ms,
        });
    }
    Ok(timings)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layer list follows the network: ResNet-18 at 224² has the 7×7
    /// stem, 16 3×3 convolutions and 3 projection shortcuts, ending at 7².
    #[test]
    fn resnet18_layers_follow_the_network() {
        let list = layers(Backbone::Resnet18, 224);
        assert_eq!(list.len(), 1 + 16 + 3);
        assert_eq!(list[0], ("stem".to_string(), [1, 64, 7, 2], 224));
        assert_eq!(list[1], ("layer1.0.a".to_string(), [64, 64, 3, 1], 56));
        let last = list.last().expect("layers");
        assert_eq!(last, &("layer4.1.b".to_string(), [512, 512, 3, 1], 7));
    }
}

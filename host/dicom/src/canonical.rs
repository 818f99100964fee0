//! Canonical chest-radiograph preprocessing, v1: stored values → (1, S, S).
//!
//! The normative text is `shared/spec/canonical-preprocessing.md`; its
//! reference implementation is `cxr_reference.py preprocess`. Steps, in the
//! spec's numbering: (3) padding mask, (4) modality LUT, (5) VOI — VOI LUT
//! Sequence, else window (LINEAR / LINEAR_EXACT / SIGMOID), else 0.5–99.5
//! percentiles, (6) polarity, (7) padding to 0, (8) centred square crop,
//! (9) exact area-averaging resize, rows then columns.
//!
//! How it is computed (same result, less work): every step up to (7) is a
//! function of the sample word alone, so for 8- and 16-bit samples (every
//! CR/DX/CT/MR image) the steps — with the unused-bit masking and sign
//! extension of step 2 — are tabulated once per possible word, and
//! percentiles come from a histogram (exact order statistics, no sort). The
//! table is then read only for the pixels of the crop, fused with the row
//! pass of the resize. Wider data whose values span at most
//! [`MAX_LUT_ENTRIES`] is tabulated over that span; anything else is mapped
//! pixel by pixel.

use serde::Serialize;

use super::header::{Geometry, ImageHeader, VoiLut};
use super::pixels::{DecodedFrame, Samples};

/// Widest stored-value range tabulated; wider data (32-bit) is mapped per pixel.
pub const MAX_LUT_ENTRIES: i64 = 1 << 20;

/// Which VOI rule of step 5 produced the image (the reference's names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VoiMethod {
    /// First item of the VOI LUT Sequence.
    VoiLutSequence,
    /// Window, VOI LUT Function LINEAR (or absent).
    WindowLinear,
    /// Window, LINEAR_EXACT.
    WindowLinearExact,
    /// Window, SIGMOID.
    WindowSigmoid,
    /// 0.5th–99.5th percentiles of non-padding modality values.
    Percentile,
    /// Percentiles, but the image is flat (every output is 0).
    PercentileFlat,
}

impl VoiMethod {
    /// The name the reference implementation prints.
    pub fn as_str(self) -> &'static str {
        match self {
            VoiMethod::VoiLutSequence => "voi-lut-sequence",
            VoiMethod::WindowLinear => "window-linear",
            VoiMethod::WindowLinearExact => "window-linear-exact",
            VoiMethod::WindowSigmoid => "window-sigmoid",
            VoiMethod::Percentile => "percentile",
            VoiMethod::PercentileFlat => "percentile-flat",
        }
    }
}

/// The model-ready image: `size` × `size` float32 in [0, 1], row-major,
/// 0 = black (air), 1 = white (bone). Shape (1, S, S) when saved.
#[derive(Debug, Clone)]
pub struct CanonicalImage {
    /// S.
    pub size: u32,
    /// S × S values, row-major.
    pub data: Vec<f32>,
    /// The VOI rule that applied.
    pub voi: VoiMethod,
}

impl CanonicalImage {
    /// Mean of all values (the reference prints it; handy for quick checks).
    pub fn mean(&self) -> f64 {
        self.data.iter().map(|&v| f64::from(v)).sum::<f64>() / self.data.len().max(1) as f64
    }
}

/// Step 5 as a function of the modality value x.
#[derive(Debug, Clone)]
enum Voi<'a> {
    Lut { lut: &'a VoiLut, scale: f64 },
    Linear { center: f64, width: f64 },
    LinearExact { center: f64, width: f64 },
    Sigmoid { center: f64, width: f64 },
    Range { lo: f64, hi: f64 },
    Flat,
}

impl Voi<'_> {
    fn apply(&self, x: f64) -> f64 {
        match *self {
            Voi::Lut { lut, scale } => {
                let idx = (x.round_ties_even() - lut.first_mapped as f64)
                    .clamp(0.0, (lut.entries - 1) as f64) as usize;
                lut.data[idx] * scale
            }
            // PS3.3 C.11.2.1.2.1: width 1 is a step at c − 0.5.
            Voi::Linear { center, width: 1.0 } => {
                if x > center - 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Voi::Linear { center, width } => {
                ((x - (center - 0.5)) / (width - 1.0) + 0.5).clamp(0.0, 1.0)
            }
            Voi::LinearExact { center, width } => ((x - center) / width + 0.5).clamp(0.0, 1.0),
            Voi::Sigmoid { center, width } => 1.0 / (1.0 + (-4.0 * (x - center) / width).exp()),
            Voi::Range { lo, hi } => ((x - lo) / (hi - lo)).clamp(0.0, 1.0),
            Voi::Flat => 0.0,
        }
    }
}

/// Steps 3–7 for one stored value: padding, modality LUT, VOI, polarity.
struct PixelMap<'a> {
    pad: Option<(i64, i64)>,
    slope: f64,
    intercept: f64,
    voi: Voi<'a>,
    invert: bool,
}

impl PixelMap<'_> {
    fn is_padding(&self, stored: i64) -> bool {
        self.pad
            .is_some_and(|(lo, hi)| lo <= stored && stored <= hi)
    }

    fn modality(&self, stored: i64) -> f64 {
        stored as f64 * self.slope + self.intercept
    }

    fn apply(&self, stored: i64) -> f32 {
        if self.is_padding(stored) {
            return 0.0;
        }
        let y = self.voi.apply(self.modality(stored));
        (if self.invert { 1.0 - y } else { y }) as f32
    }
}

/// Runs canonical preprocessing v1 on frame 1 at output size `size`.
pub fn preprocess(
    header: &ImageHeader,
    geometry: &Geometry,
    frame: &DecodedFrame<'_>,
    size: u32,
) -> CanonicalImage {
    // Modality LUT (step 4).
    let (slope, intercept) = header.modality_rescale();
    let mut map = PixelMap {
        pad: padding_range(header, geometry),
        slope,
        intercept,
        voi: Voi::Flat,
        invert: geometry.monochrome1
            ^ (header.presentation_lut_shape.as_deref() == Some("INVERSE")),
    };
    let bits = frame.bits;

    // The distinct stored values and how often each occurs, when cheap to count.
    let histogram = match &frame.samples {
        Samples::U8(s) => Some(Histogram::of_words(
            s.iter().map(|&v| usize::from(v)),
            256,
            |w| bits.stored(w),
        )),
        Samples::U16(s) => Some(Histogram::of_words(
            s.iter().map(|&v| usize::from(v)),
            65536,
            |w| bits.stored(w),
        )),
        Samples::Stored(v) => Histogram::of_stored(v),
    };

    // VOI (step 5): file's LUT, else file's window, else percentiles.
    let (voi, method) = file_voi(header).unwrap_or_else(|| {
        let (lo, hi) = match &histogram {
            Some(h) => h.modality_percentiles(&map),
            None => sorted_percentiles(&frame.stored_values(), &map),
        };
        if hi <= lo {
            (Voi::Flat, VoiMethod::PercentileFlat)
        } else {
            (Voi::Range { lo, hi }, VoiMethod::Percentile)
        }
    });
    map.voi = voi;

    // Steps 8 and 9 over steps 2–7, tabulated per sample word where possible.
    let crop = Crop::centred(frame.rows as usize, frame.columns as usize, size as usize);
    let data = match &frame.samples {
        Samples::U8(s) => {
            let table: Vec<f32> = (0..256u32).map(|w| map.apply(bits.stored(w))).collect();
            crop.resize(s, |v| table[usize::from(v)])
        }
        Samples::U16(s) => {
            let table: Vec<f32> = (0..65536u32).map(|w| map.apply(bits.stored(w))).collect();
            crop.resize(s, |v| table[usize::from(v)])
        }
        Samples::Stored(v) => match &histogram {
            Some(h) => {
                let (min, max) = (h.min(), h.max());
                let table: Vec<f32> = (min..=max).map(|x| map.apply(x)).collect();
                crop.resize(v, |x| table[(i64::from(x) - min) as usize])
            }
            None => crop.resize(v, |x| map.apply(x.into())),
        },
    };
    CanonicalImage {
        size,
        data,
        voi: method,
    }
}

/// The VOI the file itself asks for: its VOI LUT, else its window.
fn file_voi(header: &ImageHeader) -> Option<(Voi<'_>, VoiMethod)> {
    if let Some(lut) = &header.voi_lut {
        let scale = 1.0 / ((1u64 << lut.bits) - 1) as f64;
        return Some((Voi::Lut { lut, scale }, VoiMethod::VoiLutSequence));
    }
    let (&center, &width) = (header.window_center.first()?, header.window_width.first()?);
    if width < 1.0 {
        return None;
    }
    Some(match header.voi_lut_function.as_deref() {
        Some("SIGMOID") => (Voi::Sigmoid { center, width }, VoiMethod::WindowSigmoid),
        Some("LINEAR_EXACT") => (
            Voi::LinearExact { center, width },
            VoiMethod::WindowLinearExact,
        ),
        _ => (Voi::Linear { center, width }, VoiMethod::WindowLinear),
    })
}

/// Steps 8 and 9: the largest centred square, resized by exact area
/// averaging to `out` × `out`, rows first, then columns.
struct Crop {
    columns: usize,
    side: usize,
    top: usize,
    left: usize,
    out: usize,
    weights: AreaWeights,
}

impl Crop {
    fn centred(rows: usize, columns: usize, out: usize) -> Self {
        let side = rows.min(columns);
        Self {
            columns,
            side,
            top: (rows - side) / 2,
            left: (columns - side) / 2,
            out,
            weights: AreaWeights::new(side, out),
        }
    }

    /// Resizes the crop of `samples`, each mapped through `value` (steps 2–7).
    fn resize<T: Copy>(&self, samples: &[T], value: impl Fn(T) -> f32) -> Vec<f32> {
        let (side, out) = (self.side, self.out);
        let mut by_rows = vec![0f32; out * side];
        for (i, acc) in by_rows.chunks_exact_mut(side).enumerate() {
            for &(j, w) in self.weights.cell(i) {
                let start = (self.top + j) * self.columns + self.left;
                for (a, &s) in acc.iter_mut().zip(&samples[start..start + side]) {
                    *a += w * value(s);
                }
            }
        }
        let mut data = vec![0f32; out * out];
        for (row_in, row_out) in by_rows.chunks_exact(side).zip(data.chunks_exact_mut(out)) {
            for (k, o) in row_out.iter_mut().enumerate() {
                let mean: f32 = self
                    .weights
                    .cell(k)
                    .iter()
                    .map(|&(j, w)| w * row_in[j])
                    .sum();
                // A mean of values in [0, 1] is in [0, 1]; in f32 the
                // weights' rounding can put it an ulp past 1 (an all-white
                // window), which the clamp takes back.
                *o = mean.clamp(0.0, 1.0);
            }
        }
        data
    }
}

/// The padding range (step 3) in stored values, if the file declares one.
fn padding_range(header: &ImageHeader, geometry: &Geometry) -> Option<(i64, i64)> {
    // Implicit VR cannot say whether padding is US or SS: read 16-bit values
    // as the Pixel Representation says (as pydicom resolves the ambiguous VR).
    let as_stored = |v: i64| {
        if geometry.signed
            && geometry.bits_allocated <= 16
            && v > i64::from(i16::MAX)
            && v <= 0xFFFF
        {
            i64::from(v as u16 as i16)
        } else {
            v
        }
    };
    let pad = as_stored(header.pixel_padding_value?);
    let limit = header.pixel_padding_range_limit.map_or(pad, as_stored);
    Some((pad.min(limit), pad.max(limit)))
}

/// How often each distinct stored value occurs, in ascending order.
struct Histogram {
    /// (stored value, count), ascending by value, counts > 0.
    bins: Vec<(i64, u64)>,
}

impl Histogram {
    /// Counts sample words (< `domain`), then merges words with the same
    /// stored value.
    fn of_words(
        words: impl Iterator<Item = usize>,
        domain: usize,
        stored: impl Fn(u32) -> i64,
    ) -> Self {
        let mut counts = vec![0u64; domain];
        for w in words {
            counts[w] += 1;
        }
        let mut bins: Vec<(i64, u64)> = counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(w, &c)| (stored(w as u32), c))
            .collect();
        bins.sort_unstable_by_key(|&(v, _)| v);
        bins.dedup_by(|later, earlier| {
            let same = later.0 == earlier.0;
            if same {
                earlier.1 += later.1;
            }
            same
        });
        Self { bins }
    }

    /// Counts stored values whose span is small enough to tabulate.
    fn of_stored(values: &[i32]) -> Option<Self> {
        let (min, max) = values.iter().fold((i64::MAX, i64::MIN), |(lo, hi), &v| {
            (lo.min(v.into()), hi.max(v.into()))
        });
        if values.is_empty() || max - min >= MAX_LUT_ENTRIES {
            return None;
        }
        let mut counts = vec![0u64; (max - min + 1) as usize];
        for &v in values {
            counts[(i64::from(v) - min) as usize] += 1;
        }
        let bins = counts
            .into_iter()
            .enumerate()
            .filter(|&(_, c)| c > 0)
            .map(|(i, c)| (min + i as i64, c))
            .collect();
        Some(Self { bins })
    }

    fn min(&self) -> i64 {
        self.bins.first().map_or(0, |b| b.0)
    }

    fn max(&self) -> i64 {
        self.bins.last().map_or(0, |b| b.0)
    }

    /// 0.5th and 99.5th percentiles of the modality values of non-padding
    /// pixels (of all pixels, if every pixel is padding).
    fn modality_percentiles(&self, map: &PixelMap<'_>) -> (f64, f64) {
        let kept: Vec<(i64, u64)> = self
            .bins
            .iter()
            .copied()
            .filter(|&(v, _)| !map.is_padding(v))
            .collect();
        let bins = if kept.is_empty() { &self.bins } else { &kept };
        let n: u64 = bins.iter().map(|b| b.1).sum();
        let kth_stored = |k: u64| {
            let mut seen = 0;
            for &(v, c) in bins {
                seen += c;
                if seen > k {
                    return v;
                }
            }
            bins.last().map_or(0, |b| b.0)
        };
        // A negative slope reverses the order of modality values.
        let kth_modality = |k: u64| {
            let k = if map.slope < 0.0 { n - 1 - k } else { k };
            map.modality(kth_stored(k))
        };
        (
            percentile(n, 0.5, &kth_modality),
            percentile(n, 99.5, &kth_modality),
        )
    }
}

/// Percentiles for data too wide to tabulate: sort the modality values.
fn sorted_percentiles(values: &[i64], map: &PixelMap<'_>) -> (f64, f64) {
    let mut xs: Vec<f64> = values
        .iter()
        .filter(|&&v| !map.is_padding(v))
        .map(|&v| map.modality(v))
        .collect();
    if xs.is_empty() {
        xs = values.iter().map(|&v| map.modality(v)).collect();
    }
    xs.sort_unstable_by(f64::total_cmp);
    let kth = |k: u64| xs[k as usize];
    (
        percentile(xs.len() as u64, 0.5, &kth),
        percentile(xs.len() as u64, 99.5, &kth),
    )
}

/// numpy's default ("linear") percentile from a k-th order statistic oracle.
fn percentile(n: u64, q: f64, kth: &dyn Fn(u64) -> f64) -> f64 {
    if n == 0 {
        return 0.0;
    }
    let index = q / 100.0 * (n - 1) as f64;
    let below = index.floor() as u64;
    let above = (below + 1).min(n - 1);
    let t = index - below as f64;
    let (a, b) = (kth(below), kth(above));
    // numpy's _lerp: exact at both ends.
    if t >= 0.5 {
        b - (b - a) * (1.0 - t)
    } else {
        a + (b - a) * t
    }
}

/// For each output cell of an n → m area resize, the input cells it covers
/// and their weights (overlap length / cell length), summing to 1.
struct AreaWeights {
    cells: Vec<Vec<(usize, f32)>>,
}

impl AreaWeights {
    fn new(n: usize, m: usize) -> Self {
        let scale = n as f64 / m as f64;
        let cells = (0..m)
            .map(|i| {
                let (start, end) = (i as f64 * scale, (i + 1) as f64 * scale);
                let first = start.floor() as usize;
                let last = (end.ceil() as usize).min(n);
                (first..last)
                    .filter_map(|j| {
                        let overlap = end.min(j as f64 + 1.0) - start.max(j as f64);
                        (overlap > 0.0).then(|| (j, (overlap / scale) as f32))
                    })
                    .collect()
            })
            .collect();
        Self { cells }
    }

    fn cell(&self, i: usize) -> &[(usize, f32)] {
        &self.cells[i]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn area_weights_cover_each_cell_once() {
        for (n, m) in [(1841, 224), (224, 224), (100, 224), (7, 3)] {
            let w = AreaWeights::new(n, m);
            for i in 0..m {
                let sum: f32 = w.cell(i).iter().map(|&(_, x)| x).sum();
                assert!((sum - 1.0).abs() < 1e-5, "{n}->{m} cell {i}: {sum}");
            }
            let mut coverage = vec![0f64; n];
            for i in 0..m {
                for &(j, x) in w.cell(i) {
                    coverage[j] += f64::from(x) * n as f64 / m as f64;
                }
            }
            assert!(coverage.iter().all(|c| (c - 1.0).abs() < 1e-4), "{n}->{m}");
        }
    }

    /// Inputs that once gave canonical values outside [0, 1] (found by the
    /// `dicom_ingest` fuzz target; kept in host/fuzz/regressions/).
    #[test]
    fn fuzz_regressions_stay_within_zero_and_one() {
        let limits = crate::LimitsConfig::default();
        let cases: [(&str, &[u8]); 1] = [(
            "window-of-all-white-63-columns.dcm",
            include_bytes!(
                "../../fuzz/regressions/dicom_ingest/window-of-all-white-63-columns.dcm"
            ),
        )];
        for (name, bytes) in cases {
            let file = crate::DicomFile::scan_bytes(bytes, &limits)
                .and_then(|s| s.parse())
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            for size in [32, 64, 224] {
                let image = crate::preprocess(&file, size, &limits).expect("preprocessed");
                let outside: Vec<_> = image
                    .data
                    .iter()
                    .filter(|v| !(0.0..=1.0).contains(*v))
                    .collect();
                assert!(
                    outside.is_empty(),
                    "{name} at {size}: {} outside, e.g. {:?}",
                    outside.len(),
                    &outside[..outside.len().min(4)]
                );
            }
        }
    }

    #[test]
    fn percentile_matches_numpy_linear() {
        // numpy.percentile(range(10), [0.5, 99.5]) == [0.045, 8.955]
        let kth = |k: u64| k as f64;
        assert!((percentile(10, 0.5, &kth) - 0.045).abs() < 1e-12);
        assert!((percentile(10, 99.5, &kth) - 8.955).abs() < 1e-12);
        assert_eq!(percentile(1, 99.5, &kth), 0.0);
    }

    #[test]
    fn window_linear_follows_ps3_3() {
        let voi = Voi::Linear {
            center: 100.0,
            width: 51.0,
        };
        assert_eq!(voi.apply(74.5), 0.0);
        assert!((voi.apply(99.5) - 0.5).abs() < 1e-12);
        assert_eq!(voi.apply(200.0), 1.0);
        let step = Voi::Linear {
            center: 10.0,
            width: 1.0,
        };
        assert_eq!(step.apply(9.4), 0.0);
        assert_eq!(step.apply(9.6), 1.0);
    }
}

//! The blocks' transforms in AVX-512 registers (x86-64): 16 tiles at a
//! time, one per lane, so that each of a tile group's (M+2)² values is one
//! 64-byte load or store, a whole cache line of the block's V or M, where
//! the AVX2 code ([`super::avx2`]) moves half lines for 8 tiles. The
//! output transform here is F(4×4)'s; F(2×2)'s stays on AVX2.
//!
//! The same arithmetic in the same order as the portable and AVX2 code
//! (no fused multiply-adds), so all three give the same bits (tested in
//! [`super::tests`]). Every function requires AVX-512 F
//! (`#[target_feature]`); the callers check the CPU.

use std::arch::x86_64::{
    __m128, __m512, __m512i, _mm256_castps_pd, _mm256_loadu_ps, _mm512_add_ps, _mm512_castpd_ps,
    _mm512_castps_pd, _mm512_castps256_ps512, _mm512_extractf32x4_ps, _mm512_insertf64x4,
    _mm512_loadu_ps, _mm512_mask_storeu_ps, _mm512_maskz_loadu_ps, _mm512_mul_ps,
    _mm512_permutex2var_ps, _mm512_set1_ps, _mm512_setr_epi32, _mm512_setzero_ps,
    _mm512_shuffle_ps, _mm512_storeu_ps, _mm512_sub_ps, _mm512_unpackhi_ps, _mm512_unpacklo_ps,
};
use std::mem::MaybeUninit;
use std::ops::Range;

use super::avx2::finish_row;
use super::{
    BLOCK_TILES, Finish, Geometry, GroupAt, LANES, PATCH, finish_tile, for_each_input_group,
    frequency_stride, tile_origins,
};

/// Tiles transformed together: one per lane of a 512-bit vector.
const WIDE: usize = 2 * LANES;

/// Bᵀ x for M + 2 vectors: [`super::input_1d`]'s operations, in its
/// order.
#[target_feature(enable = "avx512f")]
#[inline]
fn input_1d<const M: usize>(x: [__m512; PATCH]) -> [__m512; PATCH] {
    input_1d_vectors!(
        M,
        x,
        _mm512_add_ps,
        _mm512_sub_ps,
        _mm512_mul_ps,
        _mm512_set1_ps,
        _mm512_setzero_ps()
    )
}

/// Patch row `i` of the tiles at `starts` (up to [`WIDE`]), gathered and
/// transformed (d B): `result[j]` holds column j of every tile, tile k in
/// lane k; zeros past the patch and the tiles.
///
/// Vector k holds row i of tile k in its low half and of tile k + 8 in
/// its high half; an 8×8 transpose inside each half (as
/// [`super::avx2`]'s, its last step across 128-bit lanes as one
/// two-source permute) then leaves tiles 0–7 low and 8–15 high.
#[target_feature(enable = "avx512f")]
#[inline]
fn patch_row<const M: usize>(
    padded: &[f32],
    row: usize,
    starts: &[usize],
    i: usize,
) -> [__m512; PATCH] {
    let zero = _mm512_setzero_ps();
    if i >= M + 2 {
        return [zero; PATCH];
    }
    let line = |lane: usize| {
        starts.get(lane).map(|&start| {
            let src = &padded[start + i * row..][..LANES];
            // SAFETY: `src` is LANES floats (one unaligned 256-bit load).
            unsafe { _mm256_loadu_ps(src.as_ptr()) }
        })
    };
    let mut lines = [zero; LANES];
    for (k, pair) in lines.iter_mut().enumerate() {
        let low = match line(k) {
            Some(low) => _mm512_castps256_ps512(low),
            None => zero,
        };
        *pair = match line(k + LANES) {
            Some(high) => _mm512_castpd_ps(_mm512_insertf64x4::<1>(
                _mm512_castps_pd(low),
                _mm256_castps_pd(high),
            )),
            None => low,
        };
    }
    let t0 = _mm512_unpacklo_ps(lines[0], lines[1]);
    let t1 = _mm512_unpackhi_ps(lines[0], lines[1]);
    let t2 = _mm512_unpacklo_ps(lines[2], lines[3]);
    let t3 = _mm512_unpackhi_ps(lines[2], lines[3]);
    let t4 = _mm512_unpacklo_ps(lines[4], lines[5]);
    let t5 = _mm512_unpackhi_ps(lines[4], lines[5]);
    let t6 = _mm512_unpacklo_ps(lines[6], lines[7]);
    let t7 = _mm512_unpackhi_ps(lines[6], lines[7]);
    let q0 = _mm512_shuffle_ps::<0x44>(t0, t2);
    let q1 = _mm512_shuffle_ps::<0xEE>(t0, t2);
    let q2 = _mm512_shuffle_ps::<0x44>(t1, t3);
    let q3 = _mm512_shuffle_ps::<0xEE>(t1, t3);
    let q4 = _mm512_shuffle_ps::<0x44>(t4, t6);
    let q5 = _mm512_shuffle_ps::<0xEE>(t4, t6);
    let q6 = _mm512_shuffle_ps::<0x44>(t5, t7);
    let q7 = _mm512_shuffle_ps::<0xEE>(t5, t7);
    // Per 256-bit half: the low 128-bit lanes of q_j and q_{j+4}
    // (columns 0–3), or their high ones (columns 4–7).
    let low: __m512i = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27);
    let high: __m512i =
        _mm512_setr_epi32(4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
    let columns = [
        _mm512_permutex2var_ps(q0, low, q4),
        _mm512_permutex2var_ps(q1, low, q5),
        _mm512_permutex2var_ps(q2, low, q6),
        _mm512_permutex2var_ps(q3, low, q7),
        _mm512_permutex2var_ps(q0, high, q4),
        _mm512_permutex2var_ps(q1, high, q5),
    ];
    input_1d::<M>(columns)
}

/// The input transform of up to [`WIDE`] tiles whose (M+2)² patches start
/// at `starts` in `padded` (rows of `row` floats, [`super::GATHER_SLACK`]
/// floats readable past each patch row's end), into `v` at `at`.
#[target_feature(enable = "avx512f")]
#[inline]
fn input_group<const M: usize>(
    padded: &[f32],
    row: usize,
    starts: &[usize],
    v: &mut [f32],
    at: GroupAt,
) {
    debug_assert!(starts.len() <= WIDE);
    input_group_vectors!(M, padded, row, starts, v, at)
}

/// The lanes of a group of `lanes` (≤ [`WIDE`]) tiles.
fn lane_mask(lanes: usize) -> u16 {
    if lanes >= WIDE {
        u16::MAX
    } else {
        (1u16 << lanes) - 1
    }
}

/// The first `src.len()` (≤ [`WIDE`]) floats of `src`, the other lanes
/// zero.
#[target_feature(enable = "avx512f")]
#[inline]
fn load(src: &[f32]) -> __m512 {
    match <&[f32; WIDE]>::try_from(src) {
        // SAFETY: `full` is WIDE floats (one unaligned 512-bit load).
        Ok(full) => unsafe { _mm512_loadu_ps(full.as_ptr()) },
        // SAFETY: the mask reads the first `src.len()` floats, `src`.
        Err(_) => unsafe { _mm512_maskz_loadu_ps(lane_mask(src.len()), src.as_ptr()) },
    }
}

/// `value`'s first `dst.len()` (≤ [`WIDE`]) lanes into `dst`.
#[target_feature(enable = "avx512f")]
#[inline]
fn store(dst: &mut [f32], value: __m512) {
    let mask = lane_mask(dst.len());
    match <&mut [f32; WIDE]>::try_from(&mut *dst) {
        // SAFETY: `full` is WIDE floats (one unaligned 512-bit store).
        Ok(full) => unsafe { _mm512_storeu_ps(full.as_mut_ptr(), value) },
        // SAFETY: the mask writes the first `dst.len()` floats, `dst`.
        Err(_) => unsafe { _mm512_mask_storeu_ps(dst.as_mut_ptr(), mask, value) },
    }
}

/// [`super::input_block`] on AVX-512: V of the tiles `tiles` for every
/// input channel, in groups of [`WIDE`] tiles.
///
/// # Safety
/// The CPU has AVX-512 F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn input_block<const M: usize>(
    padded: &[f32],
    geometry: Geometry,
    channels: usize,
    tiles: Range<usize>,
    v: &mut [f32],
) {
    let padded_w = geometry.padded().1;
    for_each_input_group::<WIDE>(geometry, channels, tiles, |starts, at| {
        input_group::<M>(padded, padded_w, starts, v, at);
    });
}

/// Aᵀ x for M + 2 vectors: [`super::output_1d`]'s operations, in its
/// order.
#[target_feature(enable = "avx512f")]
#[inline]
fn output_1d<const M: usize>(x: [__m512; PATCH]) -> [__m512; 4] {
    output_1d_vectors!(
        M,
        x,
        _mm512_add_ps,
        _mm512_sub_ps,
        _mm512_mul_ps,
        _mm512_set1_ps,
        _mm512_setzero_ps()
    )
}

/// F(4×4)'s output transform of up to [`WIDE`] tiles, one per lane, from
/// the products at `at`: `y[i][j]` = output row i, column j.
#[target_feature(enable = "avx512f")]
#[inline]
fn output_group(products: &[f32], at: GroupAt, lanes: usize) -> [[__m512; 4]; 4] {
    output_group_vectors!(4, products, at, lanes, _mm512_setzero_ps())
}

/// One output row (4 columns) of 16 tiles: `row[j]` holds column j of
/// every tile; returns four vectors, vector c holding the row of tile
/// 4L + c in its 128-bit lane L.
#[target_feature(enable = "avx512f")]
#[inline]
fn tile_rows(row: [__m512; 4]) -> [__m512; 4] {
    let t0 = _mm512_unpacklo_ps(row[0], row[1]);
    let t1 = _mm512_unpackhi_ps(row[0], row[1]);
    let t2 = _mm512_unpacklo_ps(row[2], row[3]);
    let t3 = _mm512_unpackhi_ps(row[2], row[3]);
    [
        _mm512_shuffle_ps::<0x44>(t0, t2),
        _mm512_shuffle_ps::<0xEE>(t0, t2),
        _mm512_shuffle_ps::<0x44>(t1, t3),
        _mm512_shuffle_ps::<0xEE>(t1, t3),
    ]
}

/// The 128-bit lane `lane` (0–3) of `x`.
#[target_feature(enable = "avx512f")]
#[inline]
fn quarter(x: __m512, lane: usize) -> __m128 {
    match lane {
        0 => _mm512_extractf32x4_ps::<0>(x),
        1 => _mm512_extractf32x4_ps::<1>(x),
        2 => _mm512_extractf32x4_ps::<2>(x),
        _ => _mm512_extractf32x4_ps::<3>(x),
    }
}

/// [`super::output_block`] for F(4×4) on AVX-512: the transform 16 tiles
/// at a time; a tile inside the plane is finished (+ bias, + residual,
/// ReLU, in [`super::output_block_generic`]'s order) and stored a row of
/// 4 at a time, a tile cut by the plane's edges element by element.
///
/// # Safety
/// The CPU has AVX-512 F; otherwise as [`super::output_block`].
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn output_block(
    products: &[f32],
    geometry: Geometry,
    tiles: Range<usize>,
    finish: Finish<'_>,
    out: *mut MaybeUninit<f32>,
) {
    debug_assert_eq!(geometry.m, 4);
    let (width, plane) = (geometry.width, geometry.height * geometry.width);
    let origins = tile_origins(geometry, tiles.clone(), finish.channels);
    for o in 0..finish.channels {
        let bias = _mm512_set1_ps(finish.bias[o]);
        let mut first = tiles.start;
        while first < tiles.end {
            let lanes = WIDE.min(tiles.end - first);
            let at = GroupAt {
                stride: frequency_stride(finish.channels),
                offset: o * BLOCK_TILES + first - tiles.start,
            };
            let y = output_group(products, at, lanes);
            // + bias on whole vectors: the same sums as per row.
            let mut rows = [[_mm512_setzero_ps(); 4]; 4];
            for (tile_row, y_row) in rows.iter_mut().zip(y) {
                let mut biased = y_row;
                for value in &mut biased {
                    *value = _mm512_add_ps(*value, bias);
                }
                *tile_row = tile_rows(biased);
            }
            let mut y_lanes = None;
            for (lane, &origin) in origins[first - tiles.start..][..lanes].iter().enumerate() {
                let base = origin.at + o * plane;
                if origin.rows == 4 && origin.cols == 4 {
                    for (i, tile_row) in rows.iter().enumerate() {
                        let value = quarter(tile_row[lane % 4], lane / 4);
                        // SAFETY: (image, o) is one of the output planes and
                        // row top + i, columns left .. left + 4 lie inside it:
                        // the caller's contract covers the write.
                        unsafe { finish_row(value, base + i * width, finish, out) };
                    }
                    continue;
                }
                let y_lanes = y_lanes.get_or_insert_with(|| lane_arrays(y));
                // SAFETY: forwarded (the caller's contract).
                unsafe { finish_tile(y_lanes, lane, origin, o, geometry, finish, out) };
            }
            first += lanes;
        }
    }
}

/// `y`'s vectors as lane arrays, for [`finish_tile`].
#[target_feature(enable = "avx512f")]
#[inline]
fn lane_arrays(y: [[__m512; 4]; 4]) -> [[[f32; WIDE]; 4]; 4] {
    let mut out = [[[0f32; WIDE]; 4]; 4];
    for (out_row, y_row) in out.iter_mut().zip(y) {
        for (cell, value) in out_row.iter_mut().zip(y_row) {
            store(cell, value);
        }
    }
    out
}

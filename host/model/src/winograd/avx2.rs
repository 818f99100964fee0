//! The Winograd transforms in AVX2 registers (x86-64): a group of
//! [`LANES`] tiles, one per lane of a 256-bit vector, from the patch
//! gather to the stores, with nothing in between written to memory.
//!
//! The portable transforms ([`super::input_group`], [`super::output_group`])
//! work on lane arrays; compiled with AVX2 they round-trip every vector
//! through the stack, and the compiler's split stores of the gather's
//! transpose then stall the loads that follow (store forwarding fails).
//! Here the same arithmetic runs on `__m256` values, in the same order,
//! with no fused multiply-adds, so both paths give the same bits
//! (tested in [`super::tests`]).
//!
//! Every function requires AVX2 and FMA (`#[target_feature]`); the
//! callers check the CPU.

use std::arch::x86_64::{
    __m128, __m256, _mm_add_ps, _mm_loadu_ps, _mm_max_ps, _mm_set1_ps, _mm_setzero_ps,
    _mm_storeu_ps, _mm256_add_ps, _mm256_castps256_ps128, _mm256_extractf128_ps, _mm256_loadu_ps,
    _mm256_mul_ps, _mm256_permute2f128_ps, _mm256_set1_ps, _mm256_setzero_ps, _mm256_shuffle_ps,
    _mm256_storeu_ps, _mm256_sub_ps, _mm256_unpackhi_ps, _mm256_unpacklo_ps,
};
use std::mem::MaybeUninit;
use std::ops::Range;

use super::{
    BLOCK_TILES, Finish, Geometry, GroupAt, LANES, PATCH, finish_tile, frequency_stride,
    tile_origins,
};

/// The rows of an 8×8 block transposed: `columns[j][lane] = rows[lane][j]`.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn transpose8(rows: [__m256; LANES]) -> [__m256; LANES] {
    // Unpack pairs, then quadruples, then halves.
    let t0 = _mm256_unpacklo_ps(rows[0], rows[1]);
    let t1 = _mm256_unpackhi_ps(rows[0], rows[1]);
    let t2 = _mm256_unpacklo_ps(rows[2], rows[3]);
    let t3 = _mm256_unpackhi_ps(rows[2], rows[3]);
    let t4 = _mm256_unpacklo_ps(rows[4], rows[5]);
    let t5 = _mm256_unpackhi_ps(rows[4], rows[5]);
    let t6 = _mm256_unpacklo_ps(rows[6], rows[7]);
    let t7 = _mm256_unpackhi_ps(rows[6], rows[7]);
    let q0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let q1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let q2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let q3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let q4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let q5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let q6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let q7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(q0, q4),
        _mm256_permute2f128_ps::<0x20>(q1, q5),
        _mm256_permute2f128_ps::<0x20>(q2, q6),
        _mm256_permute2f128_ps::<0x20>(q3, q7),
        _mm256_permute2f128_ps::<0x31>(q0, q4),
        _mm256_permute2f128_ps::<0x31>(q1, q5),
        _mm256_permute2f128_ps::<0x31>(q2, q6),
        _mm256_permute2f128_ps::<0x31>(q3, q7),
    ]
}

/// Bᵀ x for M + 2 vectors: [`super::input_1d`]'s operations, in its
/// order.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn input_1d<const M: usize>(x: [__m256; PATCH]) -> [__m256; PATCH] {
    input_1d_vectors!(
        M,
        x,
        _mm256_add_ps,
        _mm256_sub_ps,
        _mm256_mul_ps,
        _mm256_set1_ps,
        _mm256_setzero_ps()
    )
}

/// Aᵀ x for M + 2 vectors: M, [`super::output_1d`]'s operations in its
/// order.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn output_1d<const M: usize>(x: [__m256; PATCH]) -> [__m256; 4] {
    output_1d_vectors!(
        M,
        x,
        _mm256_add_ps,
        _mm256_sub_ps,
        _mm256_mul_ps,
        _mm256_set1_ps,
        _mm256_setzero_ps()
    )
}

/// The first `len` (≤ [`LANES`]) floats at `src`, the other lanes zero.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn load(src: &[f32]) -> __m256 {
    match <&[f32; LANES]>::try_from(src) {
        // SAFETY: `full` is LANES floats (one unaligned 256-bit load).
        Ok(full) => unsafe { _mm256_loadu_ps(full.as_ptr()) },
        Err(_) => {
            let mut lanes = [0f32; LANES];
            lanes[..src.len()].copy_from_slice(src);
            // SAFETY: as above.
            unsafe { _mm256_loadu_ps(lanes.as_ptr()) }
        }
    }
}

/// `value`'s first `dst.len()` (≤ [`LANES`]) lanes into `dst`.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn store(dst: &mut [f32], value: __m256) {
    match <&mut [f32; LANES]>::try_from(&mut *dst) {
        // SAFETY: `full` is LANES floats (one unaligned 256-bit store).
        Ok(full) => unsafe { _mm256_storeu_ps(full.as_mut_ptr(), value) },
        Err(_) => {
            let mut lanes = [0f32; LANES];
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), value) };
            let len = dst.len();
            dst.copy_from_slice(&lanes[..len]);
        }
    }
}

/// [`super::input_group`] in registers: the input transform of up to
/// [`LANES`] tiles whose (M+2)² patches start at `starts` in `padded`
/// (rows of `row` floats), into `v` at `at`. Per patch row, one 8-float
/// load per tile and an 8×8 transpose.
///
/// Panics (a bounds check) when a start's rows, read [`LANES`] floats
/// wide, pass the end of `padded` ([`super::GATHER_SLACK`]).
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) fn input_group<const M: usize>(
    padded: &[f32],
    row: usize,
    starts: &[usize],
    v: &mut [f32],
    at: GroupAt,
) {
    debug_assert!(starts.len() <= LANES);
    input_group_vectors!(M, padded, row, starts, v, at)
}

/// Patch row `i` of the tiles at `starts`, gathered (one 8-float load per
/// tile, an 8×8 transpose) and transformed (d B); zeros past the patch.
/// Inlined into [`input_group`], whose AVX2 and FMA it then runs with.
#[inline(always)]
fn patch_row<const M: usize>(
    padded: &[f32],
    row: usize,
    starts: &[usize],
    i: usize,
) -> [__m256; PATCH] {
    // SAFETY (of each intrinsic and target-feature call below): this
    // function only runs inlined into `input_group`, compiled with AVX2
    // and FMA, whose callers checked the CPU.
    let zero = unsafe { _mm256_setzero_ps() };
    if i >= M + 2 {
        return [zero; PATCH];
    }
    let mut lines = [zero; LANES];
    for (line, &start) in lines.iter_mut().zip(starts) {
        let src = &padded[start + i * row..][..LANES];
        // SAFETY: as above; `src` is LANES floats (one unaligned 256-bit
        // load).
        *line = unsafe { _mm256_loadu_ps(src.as_ptr()) };
    }
    // SAFETY: as above.
    let [c0, c1, c2, c3, c4, c5, _, _] = unsafe { transpose8(lines) };
    // SAFETY: as above.
    unsafe { input_1d::<M>([c0, c1, c2, c3, c4, c5]) }
}

/// [`super::output_group`] in registers: `y[i][j]` = output row i,
/// column j (i, j < M) of `lanes` tiles, one per lane.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn output_group<const M: usize>(products: &[f32], at: GroupAt, lanes: usize) -> [[__m256; 4]; 4] {
    output_group_vectors!(M, products, at, lanes, _mm256_setzero_ps())
}

/// [`super::output_group`]'s lane arrays, from the registers.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) fn output_group_lanes<const M: usize>(
    products: &[f32],
    at: GroupAt,
    lanes: usize,
) -> [[[f32; LANES]; 4]; 4] {
    lane_arrays(output_group::<M>(products, at, lanes))
}

/// `y`'s vectors as the portable code's lane arrays.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn lane_arrays(y: [[__m256; 4]; 4]) -> [[[f32; LANES]; 4]; 4] {
    let mut out = [[[0f32; LANES]; 4]; 4];
    for (out_row, y_row) in out.iter_mut().zip(y) {
        for (cell, value) in out_row.iter_mut().zip(y_row) {
            store(cell, value);
        }
    }
    out
}

/// One output row (4 columns) of each of 8 tiles: `rows[j]` holds column
/// j of every tile; returns tile k's row as a 128-bit vector.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn tile_rows(rows: [__m256; 4]) -> [__m128; LANES] {
    let t0 = _mm256_unpacklo_ps(rows[0], rows[1]);
    let t1 = _mm256_unpackhi_ps(rows[0], rows[1]);
    let t2 = _mm256_unpacklo_ps(rows[2], rows[3]);
    let t3 = _mm256_unpackhi_ps(rows[2], rows[3]);
    // Tiles 0–3 in the low halves, 4–7 in the high ones.
    let q = [
        _mm256_shuffle_ps::<0x44>(t0, t2),
        _mm256_shuffle_ps::<0xEE>(t0, t2),
        _mm256_shuffle_ps::<0x44>(t1, t3),
        _mm256_shuffle_ps::<0xEE>(t1, t3),
    ];
    [
        _mm256_castps256_ps128(q[0]),
        _mm256_castps256_ps128(q[1]),
        _mm256_castps256_ps128(q[2]),
        _mm256_castps256_ps128(q[3]),
        _mm256_extractf128_ps::<1>(q[0]),
        _mm256_extractf128_ps::<1>(q[1]),
        _mm256_extractf128_ps::<1>(q[2]),
        _mm256_extractf128_ps::<1>(q[3]),
    ]
}

/// One row of a 4×4 tile inside the plane, its bias already added in
/// `value`: adds the residual and applies the ReLU as `finish` says, then
/// stores it at `at` of the output.
///
/// # Safety
/// The 4 floats at `at` lie in one output plane, which no other thread
/// reads or writes meanwhile.
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(super) unsafe fn finish_row(
    mut value: __m128,
    at: usize,
    finish: Finish<'_>,
    out: *mut MaybeUninit<f32>,
) {
    if let Some(r) = finish.residual {
        let skip = &r[at..at + 4];
        // SAFETY: `skip` is 4 floats (one 128-bit load).
        value = _mm_add_ps(value, unsafe { _mm_loadu_ps(skip.as_ptr()) });
    }
    if finish.relu {
        value = _mm_max_ps(value, _mm_setzero_ps());
    }
    // SAFETY: the caller's contract covers the write.
    unsafe { _mm_storeu_ps(out.add(at).cast(), value) };
}

/// [`super::output_block`] with the transforms in registers: a 4×4 tile
/// inside the plane is finished (+ bias, + residual, ReLU, in
/// [`super::output_block_generic`]'s order) and stored a row of 4 at a
/// time; tiles cut by the plane's edges, and 2×2 tiles, element by
/// element.
///
/// # Safety
/// As [`super::output_block`].
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn output_block<const M: usize>(
    products: &[f32],
    geometry: Geometry,
    tiles: Range<usize>,
    finish: Finish<'_>,
    out: *mut MaybeUninit<f32>,
) {
    let (width, plane) = (geometry.width, geometry.height * geometry.width);
    let origins = tile_origins(geometry, tiles.clone(), finish.channels);
    for o in 0..finish.channels {
        let bias4 = _mm_set1_ps(finish.bias[o]);
        let mut first = tiles.start;
        while first < tiles.end {
            let lanes = LANES.min(tiles.end - first);
            let at = GroupAt {
                stride: frequency_stride(finish.channels),
                offset: o * BLOCK_TILES + first - tiles.start,
            };
            let y = output_group::<M>(products, at, lanes);
            // Tile k's output rows as 128-bit vectors (4×4 tiles only).
            let rows = (M == 4).then_some([
                tile_rows(y[0]),
                tile_rows(y[1]),
                tile_rows(y[2]),
                tile_rows(y[3]),
            ]);
            let mut y_lanes = None;
            for (lane, &origin) in origins[first - tiles.start..][..lanes].iter().enumerate() {
                let base = origin.at + o * plane;
                if let Some(rows) = &rows
                    && origin.rows == M
                    && origin.cols == M
                {
                    for (i, tile_row) in rows.iter().enumerate() {
                        let value = _mm_add_ps(tile_row[lane], bias4);
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

"""Pillow 13's BILINEAR resize to 32x32 in TensorFlow ops, bit for bit (src/libImaging/Resample.c).

Pillow's resize arithmetic for 8-bit images: the filter weights become integers scaled by
2**PRECISION_BITS, and each output is their sum times the pixels, plus half of that scale, shifted
right (floor) and clipped to 0..255. Each step below is that arithmetic, exactly.
"""

from __future__ import annotations

import tensorflow as tf

from contract.signatures import INPUT_SIZE

# PRECISION_BITS = 32 - 8 - 2 leaves room in Pillow's int32 sums for 8-bit pixels and weights that
# overshoot.
_PRECISION_BITS = 32 - 8 - 2
_BILINEAR_SUPPORT = 1.0  # the triangle filter reaches 1 input pixel each side, times the downscale

# A float32 matmul is exact when every product and partial sum is an integer below 2**24 (float32's
# 24-bit significand), whatever order and fused multiply-adds it uses.
_FLOAT32_EXACT_BELOW = 2**24
# Pieces of at most 11 bits also stay exact on GPUs, whose float32 matmuls by default round their
# inputs to TensorFloat-32 (11 significant bits); pixels (8 bits) always do.
_MAX_PIECE_BITS = 11
_COEFFICIENT_BITS = _PRECISION_BITS + 1  # a coefficient is at most 2**22
# Below this many pixel values, casting them to float64 costs less than cutting coefficients up.
_PIECES_FROM_VALUES = 1 << 20


def resize_like_pillow(image: tf.Tensor) -> tf.Tensor:
    """float32 [H, W, 3] integer pixels 0..255 -> float32 [32, 32, 3]: exactly the pixels of Pillow's
    `Image.resize((32, 32), Image.Resampling.BILINEAR)` on the same uint8 image.

    Pillow resizes in two separable passes and rounds to uint8 after each, so the order of the passes
    shows in the result. Pillow 13 (`ImagingResampleInner`) runs the vertical pass first when the
    height shrinks by more than twice as many pixels as the width (that makes the horizontal pass
    cheaper), else the horizontal one first; older releases order tall images differently, so the
    gateway must run Pillow 13 for the pixels to agree. Pillow skips a pass whose size is already 32;
    here that pass's coefficients are the identity (weights 1 and 0 at scale 1), so it changes nothing.
    """
    height_shrink = tf.shape(image)[0] - INPUT_SIZE
    width_shrink = tf.shape(image)[1] - INPUT_SIZE
    return tf.cond(
        (height_shrink > 0) & (height_shrink > 2 * width_shrink),
        lambda: _horizontal_pass(_vertical_pass(image)),
        lambda: _vertical_pass(_horizontal_pass(image)),
    )


def _horizontal_pass(pixels: tf.Tensor) -> tf.Tensor:
    """float32 [H, W, 3] -> [H, 32, 3], integer pixels: Pillow's `ImagingResampleHorizontal_8bpc`."""
    height, width = tf.shape(pixels)[0], tf.shape(pixels)[1]
    # Channels first, each row of each channel is a contiguous line of W values to resample.
    lines = tf.reshape(tf.transpose(pixels, [2, 0, 1]), [3 * height, width])
    sums = _exact_matmul(lines, _pillow_coefficients(width))  # [3H, 32]
    return tf.transpose(tf.reshape(_fixed_point_to_pixels(sums), [3, height, INPUT_SIZE]), [1, 2, 0])


def _vertical_pass(pixels: tf.Tensor) -> tf.Tensor:
    """float32 [H, W, 3] -> [32, W, 3], integer pixels: Pillow's `ImagingResampleVertical_8bpc`."""
    height, width = tf.shape(pixels)[0], tf.shape(pixels)[1]
    # Each column of this [H, 3W] matrix is a line to resample; the matmul reads it transposed.
    columns = tf.reshape(pixels, [height, width * 3])
    sums = _exact_matmul(columns, _pillow_coefficients(height), lines_transposed=True)  # [3W, 32]
    return tf.reshape(tf.transpose(_fixed_point_to_pixels(sums)), [INPUT_SIZE, width, 3])


def _fixed_point_to_pixels(sums: tf.Tensor) -> tf.Tensor:
    """float64 integer sums -> float32 pixels, as Pillow's `clip8`: add 2**21 (half of the scale),
    shift right by 22 bits (a floor), clip to 0..255. Exact: it divides by a power of two."""
    shifted = tf.floor((sums + 2.0 ** (_PRECISION_BITS - 1)) / 2.0**_PRECISION_BITS)
    return tf.cast(tf.clip_by_value(shifted, 0.0, 255.0), tf.float32)


def _exact_matmul(lines: tf.Tensor, coefficients: tf.Tensor, lines_transposed: bool = False) -> tf.Tensor:
    """float32 [M, N] lines of integer pixels 0..255 ([N, M] if lines_transposed) times float64
    [32, N] integer coefficients -> float64 [M, 32]: exactly the sums Pillow accumulates in int32.

    A float64 matmul is exact here: every product (at most 255 * 2**22) and partial sum (below 2**31)
    is an integer far below 2**53, in whatever order the matmul adds. But casting a 12-megapixel photo
    to float64 made its resize about three times slower (measured). So a large image is summed in
    float32, exact for integers below 2**24 only: each coefficient is cut into `bits`-bit pieces,
    k = sum_j piece_j << (bits * j), with `bits` as large as keeps every piece's sum (at most
    255 * taps * (2**bits - 1) over a line's `taps` nonzero coefficients) below 2**24; one float32
    matmul sums all the pieces, and float64 shifts the piece sums back into place and adds them.
    """
    bits = _exact_piece_bits(coefficients)

    def in_float64() -> tf.Tensor:
        pixels = tf.cast(lines, tf.float64)
        return tf.matmul(pixels, coefficients, transpose_a=lines_transposed, transpose_b=True)

    def in_pieces() -> tf.Tensor:
        return _matmul_in_pieces(lines, coefficients, bits, lines_transposed)

    small = tf.size(lines, out_type=tf.int64) < _PIECES_FROM_VALUES
    return tf.cond(small | (bits == 0), in_float64, in_pieces)


def _exact_piece_bits(coefficients: tf.Tensor) -> tf.Tensor:
    """int32 scalar: the widest pieces (at most _MAX_PIECE_BITS) whose float32 sums over a line stay
    exact; 0 when even 1-bit pieces would not (over 65,793 taps)."""
    taps = tf.reduce_max(tf.math.count_nonzero(coefficients, axis=1))
    candidates = tf.range(1, _MAX_PIECE_BITS + 1, dtype=tf.int64)
    fits = 255 * taps * (2**candidates - 1) < _FLOAT32_EXACT_BELOW
    return tf.cast(tf.reduce_max(tf.where(fits, candidates, 0)), tf.int32)


def _matmul_in_pieces(
    lines: tf.Tensor, coefficients: tf.Tensor, bits: tf.Tensor, lines_transposed: bool
) -> tf.Tensor:
    """_exact_matmul's float32 path: coefficients cut into `bits`-bit pieces, summed in one float32
    matmul, shifted back into place and added in float64."""
    count = (_COEFFICIENT_BITS + bits - 1) // bits
    shifts = bits * tf.range(count)
    integers = tf.cast(coefficients, tf.int32)
    pieces = tf.bitwise.right_shift(integers, shifts[:, tf.newaxis, tf.newaxis]) % 2**bits
    pieces = tf.reshape(tf.cast(pieces, tf.float32), [count * INPUT_SIZE, -1])  # [count * 32, N]
    sums = tf.matmul(lines, pieces, transpose_a=lines_transposed, transpose_b=True)
    sums = tf.cast(tf.reshape(sums, [-1, count, INPUT_SIZE]), tf.float64)
    return tf.einsum("mcj,c->mj", sums, tf.cast(2**shifts, tf.float64))


def _pillow_coefficients(in_size: tf.Tensor) -> tf.Tensor:
    """float64 [32, in_size]: the integer weight (scaled by 2**22) of each input pixel in each of the
    32 outputs along one axis, as Pillow's `precompute_coeffs` and `normalize_coeffs_8bpc` make them
    for the BILINEAR filter.

    Each step is Pillow's double arithmetic in Pillow's order, so that every truncation to int lands
    where Pillow's does: the weights are the triangle filter over a window of input pixels, divided
    by their sum, scaled and rounded; a different order or precision moves some rounding by one.
    """
    columns, weights = _bilinear_windows(in_size)
    # Pillow leaves a window whose weights sum to 0 as it is (all zero); divide_no_nan does the same.
    normalized = tf.math.divide_no_nan(weights, _sum_left_to_right(weights)[:, tf.newaxis])
    # (int)(0.5 + w * 2**22): truncation is floor here, as bilinear weights are never negative.
    fixed_point = tf.floor(0.5 + normalized * 2.0**_PRECISION_BITS)
    # Spread the windows into a dense [32, in_size] matrix for one matmul. Taps past a window's end
    # (weight 0) are clamped onto the last column; scatter_nd adds duplicates, and adding 0 is exact.
    rows = tf.broadcast_to(tf.range(INPUT_SIZE)[:, tf.newaxis], tf.shape(columns))
    indices = tf.stack([rows, tf.minimum(columns, in_size - 1)], axis=-1)
    return tf.scatter_nd(indices, fixed_point, [INPUT_SIZE, in_size])


def _bilinear_windows(in_size: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(columns int32 [32, T], weights float64 [32, T]): tap t of output i reads input pixel
    columns[i, t] with the triangle filter's unnormalized weight; taps past a window's end weigh 0."""
    scale = tf.cast(in_size, tf.float64) / INPUT_SIZE
    filterscale = tf.maximum(scale, 1.0)  # downscaling widens the filter (antialiasing)
    support = _BILINEAR_SUPPORT * filterscale
    inverse_filterscale = 1.0 / filterscale
    center = (tf.range(INPUT_SIZE, dtype=tf.float64) + 0.5) * scale
    # Each output's window [first, end) of input pixels. C's (int) and tf.cast both truncate toward
    # zero (not floor), which matters for a negative `first` before it is clamped to 0.
    first = tf.maximum(tf.cast(center - support + 0.5, tf.int32), 0)
    end = tf.minimum(tf.cast(center + support + 0.5, tf.int32), in_size)
    offsets = tf.range(tf.reduce_max(end - first))
    columns = first[:, tf.newaxis] + offsets
    distance = tf.abs((tf.cast(columns, tf.float64) - center[:, tf.newaxis] + 0.5) * inverse_filterscale)
    weights = tf.where((columns < end[:, tf.newaxis]) & (distance < 1.0), 1.0 - distance, 0.0)
    return columns, weights


def _sum_left_to_right(values: tf.Tensor) -> tf.Tensor:
    """float64 [N, T] -> [N]: each row's sum, added one value at a time from the left like Pillow's
    `ww += w` loop. A float sum's last bit depends on the order of the additions (tf.reduce_sum adds
    in blocks, a GPU cumsum in a tree), and the weights are divided by it, so the order is fixed here
    by a loop: at most 2 * ceil(downscale) + 1 steps on [N] vectors."""

    def add_next(t: tf.Tensor, total: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return t + 1, total + values[:, t]

    _, total = tf.while_loop(
        lambda t, _: t < tf.shape(values)[1], add_next, (tf.constant(0), tf.zeros_like(values[:, 0]))
    )
    return total

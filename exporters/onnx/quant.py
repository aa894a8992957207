"""Block quantisation of weight matrices into the layouts onnxruntime's contrib kernels read.

``MatMulNBits`` (com.microsoft) computes ``A @ dequant(B).T`` where ``B`` is a Hugging Face
``[N=out, K=in]`` matrix cut along K into blocks of ``block_size`` values, each block with one
scale and (asymmetric) one zero point: ``w = (q - zero_point) * scale``.

Layouts, for ``n_blocks = ceil(K / block_size)`` (K is zero-padded up to a whole block):

- ``B``: uint8 ``[N, n_blocks, block_size * bits / 8]``; 4-bit values two per byte, the first
  of each pair in the low nibble;
- ``scales``: float ``[N, n_blocks]`` (the compute dtype: float32, or float16 for fp16 graphs);
- ``zero_points``: uint8 ``[N, ceil(n_blocks * bits / 8)]``, 4-bit ones packed like ``B``;
  absent when symmetric, where the kernel uses the midpoint ``2**(bits-1)``.

``GatherBlockQuantized`` (com.microsoft) reads the same bytes as ``[N, K * bits / 8]`` for an
embedding table quantised along its hidden axis.

Symmetric blocks start from mapping the value of largest magnitude to ``-2**(bits-1)`` (the scale
takes its sign), so one more level is used than with ``max|w| / (2**(bits-1) - 1)``; asymmetric
blocks start from ``[min, max]`` (widened to include 0, so zero stays exact) over
``0 .. 2**bits - 1``. From there a small search over the scale keeps the one with the least
squared error per block (see ``SCALE_SEARCH``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SUPPORTED_BITS = (4, 8)


@dataclass
class BlockQuantized:
    """One quantised ``[N, K]`` matrix in MatMulNBits layout."""

    packed: np.ndarray  # uint8 [N, n_blocks, block_size * bits // 8]
    scales: np.ndarray  # float [N, n_blocks]
    zero_points: np.ndarray | None  # uint8 [N, ceil(n_blocks * bits / 8)], None when symmetric
    bits: int
    block_size: int
    k: int  # the real (unpadded) K

    @property
    def n(self) -> int:
        return self.packed.shape[0]

    @property
    def n_blocks(self) -> int:
        return self.packed.shape[1]

    def packed_2d(self) -> np.ndarray:
        """``[N, n_blocks * block_size * bits / 8]``: the GatherBlockQuantized view of the same bytes."""
        return self.packed.reshape(self.n, -1)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 values < 16, last axis even -> two per byte, first of each pair in the low nibble."""
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def _unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    out = np.empty(packed.shape[:-1] + (packed.shape[-1] * 2,), dtype=np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


# Scale multipliers tried per block (1.0 is plain round-to-nearest from the block's range). A
# slightly smaller scale clips the largest value a little and resolves every other value more
# finely, which often lowers the block's error; the search keeps whichever scale gives each block
# the least (importance-weighted) squared error, as llama.cpp's quantisers do.
SCALE_SEARCH = tuple(np.round(np.linspace(0.80, 1.0, 11), 3))


def _search_scales(blocks, base, lo, levels, symmetric, weights, scale_dtype, search):
    """Per block, the candidate scale (``base * f``) and zero point with the least weighted error.
    Scales are rounded to ``scale_dtype`` before use, so fp16 scales do not add a second rounding."""
    best_err = best_scale = best_zero = None
    for f in (SCALE_SEARCH if search else (1.0,)):
        scale = (base * f).astype(scale_dtype).astype(np.float32)
        safe = np.where(scale == 0, 1, scale)
        if symmetric:
            zero = np.full(scale.shape, levels // 2, dtype=np.float32)
        else:
            zero = np.clip(np.round(-lo / safe), 0, levels - 1)
        q = np.clip(np.round(blocks / safe[..., None]) + zero[..., None], 0, levels - 1)
        diff = (q - zero[..., None]) * scale[..., None] - blocks
        err = (diff * diff * weights).sum(-1) if weights is not None else (diff * diff).sum(-1)
        if best_err is None:
            best_err, best_scale, best_zero = err, scale, zero
        else:
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_scale = np.where(better, scale, best_scale)
            best_zero = np.where(better, zero, best_zero)
    return best_scale.astype(scale_dtype), best_zero


def quantize_blocks(w: np.ndarray, bits: int = 4, block_size: int = 32, symmetric: bool = True,
                    scale_dtype=np.float32, search: bool = True, importance: np.ndarray | None = None) -> BlockQuantized:
    """Quantise ``w`` (``[N, K]``, float) block-wise along K. See the module docstring.

    ``search``: try the scales in ``SCALE_SEARCH`` per block and keep the best; ``importance``
    (``[K]``): weights of each input column in that error (an importance matrix's values)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    n_blocks = -(-k // block_size)
    padded = np.zeros((n, n_blocks * block_size), dtype=np.float32)
    padded[:, :k] = w
    blocks = padded.reshape(n, n_blocks, block_size)
    levels = 2 ** bits
    if symmetric:
        idx = np.abs(blocks).argmax(axis=-1)[..., None]
        extreme = np.take_along_axis(blocks, idx, axis=-1)[..., 0]  # signed value of largest magnitude
        base = extreme / -(levels // 2)
        lo = None
    else:
        lo = np.minimum(blocks.min(axis=-1), 0.0)
        hi = np.maximum(blocks.max(axis=-1), 0.0)
        base = (hi - lo) / (levels - 1)
    weights = None
    if importance is not None:  # per input column, e.g. mean squared activation (an importance matrix)
        imp = np.zeros(n_blocks * block_size, dtype=np.float32)
        imp[:k] = np.asarray(importance, dtype=np.float32)
        weights = imp.reshape(1, n_blocks, block_size)
    scales, zero = _search_scales(blocks, base, lo, levels, symmetric, weights, scale_dtype, search)
    safe = np.where(scales == 0, 1, scales).astype(np.float32)[..., None]
    q = np.clip(np.round(blocks / safe) + zero[..., None], 0, levels - 1).astype(np.uint8)
    packed = _pack_nibbles(q) if bits == 4 else q
    zero_points = None
    if not symmetric:
        zp = zero.astype(np.uint8)
        if bits == 4:
            if n_blocks % 2:
                zp = np.concatenate([zp, np.zeros((n, 1), np.uint8)], axis=1)
            zp = _pack_nibbles(zp)
        zero_points = np.ascontiguousarray(zp)
    return BlockQuantized(np.ascontiguousarray(packed), np.ascontiguousarray(scales), zero_points, bits, block_size, k)


def dequantize_blocks(bq: BlockQuantized) -> np.ndarray:
    """The float32 ``[N, K]`` matrix the kernels compute with (for tests and quality checks)."""
    q = _unpack_nibbles(bq.packed) if bq.bits == 4 else bq.packed
    if bq.zero_points is None:
        zero = np.full(bq.scales.shape, 2 ** (bq.bits - 1), dtype=np.float32)
    else:
        zp = _unpack_nibbles(bq.zero_points) if bq.bits == 4 else bq.zero_points
        zero = zp[:, : bq.n_blocks].astype(np.float32)
    w = (q.astype(np.float32) - zero[..., None]) * bq.scales.astype(np.float32)[..., None]
    return w.reshape(bq.n, -1)[:, : bq.k]

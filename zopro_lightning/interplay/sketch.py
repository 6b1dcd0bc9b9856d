"""Seeded count-sketch projection of a named set of tensors to a fixed dimension.

A dense Gaussian projection from D to m dimensions needs a D x m matrix, far too large
when D is the size of a LoRA adapter (millions). We use a *count sketch* (Charikar,
Chen & Farach-Colton 2002; the sparse JL transform with one non-zero per column):

    y[b] = sum_{i : h(i) = b} s(i) x[i],     h(i) in {0..m-1},  s(i) in {-1, +1}

i.e. ``y = S x`` with ``S`` an m x D matrix holding exactly one ``+-1`` per column.
Properties used by the analysis:

* linear, so ``S(x1 - x0) = S x1 - S x0``: updates of the sketch are sketches of updates;
* unbiased for inner products, ``E[<Sx, Sy>] = <x, y>`` (so norms and angles are kept in
  expectation, with variance ~ ``||x||^2 ||y||^2 / m``);
* stateless and chunkable: ``h`` and ``s`` are a hash of ``(seed, tensor name, index in
  the flattened tensor)`` (splitmix64), so nothing of size D is ever materialised, the
  same projection is recomputed identically for every snapshot and every process, and two
  models that share a tensor name (policy and reward model with the same LoRA layout)
  project that tensor onto the same buckets, i.e. they share a sketch space.

The bucket is the 64-bit hash modulo m (bias < m / 2**64), the sign its top bit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

SKETCH_KIND = "countsketch-splitmix64-v1"
_CHUNK = 1 << 20

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser on a uint64 array (wrap-around arithmetic)."""
    z = x + _GAMMA
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def _name_key(seed: int, name: str) -> np.uint64:
    """A 64-bit key for one tensor, stable across processes and Python versions."""
    digest = hashlib.blake2b(f"{seed}\x00{name}".encode(), digest_size=8).digest()
    return np.uint64(int.from_bytes(digest, "little"))


def sketch_tensor(values: np.ndarray, name: str, dim: int, seed: int) -> np.ndarray:
    """Count sketch ``S_name x`` of one flattened tensor, as a float64 vector of length dim."""
    flat = np.ravel(values)
    out = np.zeros(dim, dtype=np.float64)
    key = _name_key(seed, name)
    with np.errstate(over="ignore"):
        for start in range(0, flat.size, _CHUNK):
            stop = min(start + _CHUNK, flat.size)
            h = _splitmix64(np.arange(start, stop, dtype=np.uint64) + key)
            bucket = (h % np.uint64(dim)).astype(np.int64)
            sign = np.where(h >> np.uint64(63), -1.0, 1.0)
            out += np.bincount(
                bucket, weights=sign * flat[start:stop].astype(np.float64), minlength=dim
            )
    return out


def count_sketch(tensors: Mapping[str, np.ndarray], dim: int, seed: int = 0) -> np.ndarray:
    """Sketch of a named set of tensors: ``sum_name S_name vec(tensors[name])``, float32 [dim].

    Independent of the order of the mapping (each tensor is hashed by its own name).
    """
    if dim < 1:
        raise ValueError(f"sketch dimension must be >= 1, got {dim}")
    out = np.zeros(dim, dtype=np.float64)
    for name in sorted(tensors):
        out += sketch_tensor(np.asarray(tensors[name]), name, dim, seed)
    return out.astype(np.float32)

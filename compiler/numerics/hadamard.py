"""The normalized Hadamard transform as an explicit matrix: Sylvester construction for powers of two,
block-diagonal copies of it for dimensions that are a multiple of a block, and the torch module that
multiplies a live activation by it (so ONNX export keeps a MatMul whose input is the activation).

Why by hand: modelopt's quantizer option `rotate` calls the CUDA-only `fast_hadamard_transform` kernel,
which has no ONNX symbolic: torch.onnx.export evaluates it eagerly and bakes the rotated example input
into a Constant. A matmul against a precomputed matrix is exact, runs anywhere and exports as MatMul.
"""

from __future__ import annotations

from functools import lru_cache
from typing import List

import numpy as np
import torch

# block sizes qcompile accepts: powers of two (Sylvester); 2..4096 covers every hidden size in use
SUPPORTED_BLOCKS = tuple(2 ** k for k in range(1, 13))


def is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


@lru_cache(maxsize=32)
def _sylvester64(n: int) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.float64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def sylvester(n: int) -> np.ndarray:
    """Normalized Sylvester-Hadamard matrix H_n (n a power of two): symmetric, H @ H = I. float64."""
    if not is_power_of_two(n):
        raise ValueError(f"Sylvester Hadamard needs a power of two, got {n}")
    return _sylvester64(n).copy()


def block_for(dim: int, block_size: int) -> int:
    """The Hadamard block used for a dimension: block_size when it divides dim (block-diagonal
    Hadamard, one Sylvester block per block_size channels); the whole dimension when dim is a power of
    two smaller than block_size (one Sylvester block). Raises ValueError otherwise."""
    if not is_power_of_two(block_size) or block_size not in SUPPORTED_BLOCKS:
        raise ValueError(f"block_size {block_size} is not a power of two in "
                         f"{SUPPORTED_BLOCKS[0]}..{SUPPORTED_BLOCKS[-1]}")
    if dim % block_size == 0:
        return block_size
    if is_power_of_two(dim) and dim < block_size:
        return dim
    raise ValueError(f"dimension {dim} is not a multiple of block_size {block_size}")


def valid_blocks(dim: int) -> List[int]:
    """Block sizes that rotate a dimension exactly (powers of two dividing it)."""
    return [b for b in SUPPORTED_BLOCKS if dim % b == 0]


def hadamard_matrix(dim: int, block_size: int) -> np.ndarray:
    """The full dim x dim rotation (block-diagonal Sylvester), float64; orthogonal and symmetric."""
    b = block_for(dim, block_size)
    return np.kron(np.eye(dim // b), sylvester(b))


class OnlineHadamard(torch.nn.Module):
    """y = x @ H along the last axis, H the normalized (block-diagonal) Hadamard of `dim`.

    Block-diagonal H is applied as (..., dim/b, b) @ H_b rather than a dense dim x dim MatMul: exact and
    dim/b times cheaper. Exported, it is Reshape -> MatMul(activation, H_b) -> Reshape; the H_b buffer
    becomes an initializer, the MatMul's other input is the live activation."""

    def __init__(self, dim: int, block_size: int, dtype=torch.float32):
        super().__init__()
        self.dim = int(dim)
        self.block = block_for(self.dim, int(block_size))
        self.register_buffer("hadamard", torch.tensor(sylvester(self.block), dtype=dtype))

    def forward(self, x):
        if self.block == self.dim:
            return torch.matmul(x, self.hadamard)
        y = torch.matmul(x.unflatten(-1, (self.dim // self.block, self.block)), self.hadamard)
        return y.flatten(-2)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, block={self.block}"

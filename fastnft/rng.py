"""Keyed random draws: every random number of a run comes from a generator seeded by
(seed, iteration, global image index, purpose), never from a process-wide stream. The same
config therefore gives the same numbers on any number of processes, and resume needs no RNG state.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

PURPOSES = ("prompt_order", "rollout_noise", "sde_noise", "timestep_subset", "training_noise", "eval_noise")


def key_seed(*key: object) -> int:
    """A 63-bit seed from any tuple of ints and strings (stable across processes and versions)."""
    digest = hashlib.blake2b(repr(key).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def generator(*key: object, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device).manual_seed(key_seed(*key))


def keyed_randn(
    shape: Sequence[int],
    seed: int,
    iteration: int,
    indices: Sequence[int],
    purpose: str,
    *extra: object,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """[len(indices), *shape] standard normals, row i drawn from the key (seed, iteration,
    indices[i], purpose, *extra) on `device`."""
    if purpose not in PURPOSES:
        raise ValueError(f"unknown purpose {purpose!r}; known: {PURPOSES}")
    rows = [
        torch.randn(
            tuple(shape),
            generator=generator(seed, iteration, index, purpose, *extra, device=device),
            device=device,
            dtype=dtype,
        )
        for index in indices
    ]
    return torch.stack(rows)

"""Prompt files and the K-repeat prompt order.

A prompt file is `.txt` (one prompt a line) or `.jsonl` (`{"prompt": ..., "metadata": {...}}` a
line, as GenEval's). Iteration i takes the prompts at positions [i * groups, (i + 1) * groups) of
an endless sequence of epochs, each epoch a permutation keyed by (seed, epoch): the position is a
function of the iteration alone, so resume needs no sampler state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastnft.rng import generator


@dataclass
class PromptSet:
    prompts: list[str]
    metadata: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.prompts)

    @classmethod
    def load(cls, path: str | Path) -> PromptSet:
        path = Path(path)
        prompts, metadata = [], []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    record = json.loads(line)
                    prompts.append(str(record["prompt"]))
                except (json.JSONDecodeError, KeyError, TypeError) as error:
                    raise ValueError(f"{path}:{number}: expected {{'prompt': ..., 'metadata': ...}}: {error}") from None
                metadata.append(dict(record.get("metadata") or {}))
            else:
                prompts.append(line.strip())
                metadata.append({})
        if not prompts:
            raise ValueError(f"{path}: holds no prompt")
        return cls(prompts, metadata)


def prompt_indices(num_prompts: int, iteration: int, groups: int, seed: int) -> list[int]:
    """Indices of the `groups` prompts of `iteration` (0-based)."""
    orders: dict[int, list[int]] = {}
    indices = []
    for position in range(iteration * groups, (iteration + 1) * groups):
        epoch, offset = divmod(position, num_prompts)
        if epoch not in orders:
            orders[epoch] = torch.randperm(num_prompts, generator=generator(seed, epoch, "prompt_order")).tolist()
        indices.append(orders[epoch][offset])
    return indices

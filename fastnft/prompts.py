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


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message names the file and, where one is at fault,
    the line."""


def read_prompt_file(path: str | Path) -> tuple[list[str], list[dict[str, Any]]]:
    """(prompts, metadata) of a .txt or .jsonl prompt file; blank lines are skipped. Raises
    PromptFileError for a file that is not UTF-8 text, a JSONL line that is not an object with a
    string "prompt" (and an object "metadata", if any), or a file without a prompt."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise PromptFileError(f"{path} line {line}: not UTF-8 text ({error.reason})") from None
    except OSError as error:
        raise PromptFileError(f"{path}: cannot read it ({error.strerror or error})") from None
    prompts: list[str] = []
    metadata: list[dict[str, Any]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append(line.strip())
            metadata.append({})
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise PromptFileError(f"{where}: not JSON ({error.msg}: column {error.colno})") from None
        if not isinstance(record, dict):
            raise PromptFileError(f'{where}: expected an object {{"prompt": ..., "metadata": {{...}}}}')
        if not isinstance(record.get("prompt"), str):
            raise PromptFileError(f'{where}: "prompt" must be a string; the line has {sorted(record) or "no key"}')
        extra = record.get("metadata")
        if extra is not None and not isinstance(extra, dict):
            raise PromptFileError(f'{where}: "metadata" must be an object, got {type(extra).__name__}')
        prompts.append(record["prompt"])
        metadata.append(dict(extra or {}))
    if not prompts:
        raise PromptFileError(f"{path}: holds no prompt (empty, or blank lines only)")
    return prompts, metadata


@dataclass
class PromptSet:
    prompts: list[str]
    metadata: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.prompts)

    @classmethod
    def load(cls, path: str | Path) -> PromptSet:
        return cls(*read_prompt_file(path))


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

"""Prompt embeddings computed once: every prompt a run trains and evaluates on is encoded at start,
in batches, and kept in host memory (pinned when a GPU is used); after that the text encoders
are idle and may leave the GPU (`model.offload_text_encoders`).

Memory: one row per distinct prompt; SD3.5-Medium's joint sequence (77 CLIP + t5_max_length T5
tokens, width 4096, bf16) is about 1.7 MB per prompt at t5_max_length 128.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from fastnft.models import TextEmbedding


class PromptEmbeddings:
    def __init__(
        self,
        encode: Callable[[list[str]], TextEmbedding],
        prompts: Iterable[str],
        *,
        batch_size: int,
        device: torch.device,
    ) -> None:
        self.encode = encode
        self.device = device
        self.encoders_available = True
        unique = list(dict.fromkeys(prompts))
        self.row = {prompt: index for index, prompt in enumerate(unique)}
        parts = [encode(unique[start : start + batch_size]) for start in range(0, len(unique), batch_size)]
        self._keep(TextEmbedding.cat(parts))

    def __len__(self) -> int:
        return len(self.row)

    def __call__(self, prompts: list[str]) -> TextEmbedding:
        """The embeddings of prompts on the device; prompts outside the cached set are encoded
        while the text encoders are still on the device."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self.row]
        if missing:
            if not self.encoders_available:
                raise ValueError(
                    f"prompt {missing[0]!r} was not cached at start and the text encoders were offloaded "
                    "(model.offload_text_encoders): set it to false to encode new prompts"
                )
            self._add(missing)
        rows = torch.tensor([self.row[p] for p in prompts])
        return self.table.index(rows).to(self.device, non_blocking=True)

    def _add(self, prompts: list[str]) -> None:
        self.row.update({prompt: len(self.row) + index for index, prompt in enumerate(prompts)})
        self._keep(TextEmbedding.cat([self.table, self.encode(prompts).to(torch.device("cpu"))]))

    def _keep(self, table: TextEmbedding) -> None:
        """Host memory, pinned when the embeddings go to a GPU."""
        table = table.to(torch.device("cpu"))
        self.table = table.pin_memory() if self.device.type == "cuda" else table

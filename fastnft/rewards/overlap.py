"""Scoring overlapped with sampling: each rollout batch is decoded and scored on a worker thread
(on a GPU, on its own CUDA stream, off the stream the sampler and training use) while the sampler
produces the next batch. The trainer waits only when it needs the scores; the results are those
of synchronous scoring, batch for batch, in submission order."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import Tensor

from fastnft.rewards.base import RewardOutput


class OverlappedScoring:
    def __init__(self, score: Callable[[Tensor, list[str], list[dict]], RewardOutput], device: torch.device) -> None:
        self.score = score
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastnft-reward")
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.futures: list[Future] = []

    def submit(self, samples: Tensor, prompts: list[str], metadata: list[dict]) -> None:
        """Queues a batch; returns at once."""
        ready = None
        if self.stream is not None:
            ready = torch.cuda.Event()
            ready.record()  # the batch is complete on the sampler's stream at this point
            samples.record_stream(self.stream)  # the allocator must not reuse it before the worker is done
        self.futures.append(self.pool.submit(self._run, samples, prompts, metadata, ready))

    def _run(self, samples: Tensor, prompts: list[str], metadata: list[dict], ready) -> RewardOutput:
        if self.stream is None:
            return self.score(samples, prompts, metadata)
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            output = self.score(samples, prompts, metadata)
        self.stream.synchronize()
        return output

    def results(self) -> RewardOutput:
        """Waits for every batch; the scores (and extras) concatenated in submission order. A
        reward's error surfaces here."""
        try:
            outputs = [future.result() for future in self.futures]
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
        return RewardOutput.cat(outputs)

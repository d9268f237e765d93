"""Rewards computed by a service: `http` (a user's scorer, e.g. a GenEval or OCR server) and
`judge` (a vision-language model behind an OpenAI-compatible API, as the reference does for
UnifiedReward). Both send PNG images, run up to `max_concurrency` requests at once, give each
`timeout` seconds, retry failures `retries` times with exponential backoff (`backoff` seconds,
doubled each time), and fail with an error naming the URL when the service is down or its reply
is malformed.

`http` posts batches of `batch_size` as JSON {"prompts": [...], "metadata": [...], "images":
[base64 PNG, ...]} and reads {"scores": [...]} (one number per image); any other key holding one
number per image becomes an extra (e.g. "accuracy", logged as eval_accuracy).

`judge` asks `model` about each image with `template` (which may name {prompt}) and reads the
score from the reply with `pattern` (its first group), multiplied by `scale`. The API key, if
any, is read from the environment variable named by `api_key_env`.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from fastnft.rewards.base import Reward, RewardOutput, register
from fastnft.visual import to_uint8

JUDGE_TEMPLATE = (
    'You are shown an image generated from the text prompt: "{prompt}". Rate how faithfully it '
    "follows the prompt and how good it looks, from 1 (poor) to 5 (excellent). "
    "End your answer with 'Final Score: X'."
)
JUDGE_PATTERN = r"Final Score:\s*([0-9]+(?:\.[0-9]+)?)"


class ServiceError(RuntimeError):
    """A remote reward failed: the message names the URL and what went wrong."""


def png_base64(images: Tensor) -> list[str]:
    """[B, 3, H, W] in [0, 1] -> base64-encoded PNGs."""
    encoded = []
    for array in to_uint8(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return encoded


class JsonClient:
    """POSTs JSON with a timeout and bounded retries (connection errors, timeouts, HTTP 5xx and
    429 are retried; other HTTP errors and unreadable replies are not)."""

    def __init__(self, url: str, *, timeout: float, retries: int, backoff: float, headers: dict[str, str]) -> None:
        self.url, self.timeout, self.retries, self.backoff = url, timeout, retries, backoff
        self.headers = {"Content-Type": "application/json", **headers}

    def post(self, payload: dict[str, Any]) -> Any:
        body = json.dumps(payload).encode()
        failure = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
            except urllib.error.HTTPError as error:
                failure = f"HTTP {error.code} {error.reason}"
                if error.code < 500 and error.code != 429:
                    break
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as error:
                reason = getattr(error, "reason", error)
                failure = (
                    f"timed out after {self.timeout:g} s" if "timed out" in str(reason) else f"unreachable ({reason})"
                )
                continue
            try:
                return json.loads(raw)
            except json.JSONDecodeError:
                raise ServiceError(f"{self.url}: the reply is not JSON: {raw[:200]!r}") from None
        raise ServiceError(f"{self.url}: {failure} (after {attempt + 1} attempts)")


def _in_parallel(function: Callable[[Any], Any], items: list[Any], max_concurrency: int) -> list[Any]:
    if max_concurrency <= 1 or len(items) <= 1:
        return [function(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(max_concurrency, len(items))) as pool:
        return list(pool.map(function, items))


def _check_positive(reward: str, **values: float) -> None:
    for name, value in values.items():
        if value <= 0:
            raise ValueError(f"reward {reward!r}: options.{name} must be > 0; got {value!r}")


@register("http")
class HttpReward(Reward):
    def __init__(
        self,
        url: str | None = None,
        batch_size: int = 16,
        max_concurrency: int = 4,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 1.0,
        headers: dict[str, str] | None = None,
    ) -> None:
        if not url:
            raise ValueError("reward 'http': set options.url to the scoring service, e.g. http://localhost:8000/score")
        _check_positive("http", batch_size=batch_size, max_concurrency=max_concurrency, timeout=timeout)
        self.batch_size, self.max_concurrency = batch_size, max_concurrency
        self.client = JsonClient(url, timeout=timeout, retries=retries, backoff=backoff, headers=headers or {})

    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        encoded = png_base64(images)
        starts = list(range(0, len(encoded), self.batch_size))

        def score_batch(start: int) -> dict[str, list[float]]:
            stop = start + self.batch_size
            reply = self.client.post(
                {"prompts": prompts[start:stop], "metadata": metadata[start:stop], "images": encoded[start:stop]}
            )
            return self._read(reply, len(encoded[start:stop]))

        replies = _in_parallel(score_batch, starts, self.max_concurrency)
        columns = {key: [v for reply in replies for v in reply[key]] for key in replies[0]}
        score = torch.tensor(columns.pop("scores"), dtype=torch.float32)
        return RewardOutput(score, {key: torch.tensor(values, dtype=torch.float32) for key, values in columns.items()})

    def _read(self, reply: Any, count: int) -> dict[str, list[float]]:
        url = self.client.url
        if not isinstance(reply, dict) or "scores" not in reply:
            raise ServiceError(f"{url}: the reply has no 'scores': {str(reply)[:200]}")
        columns = {}
        for key, values in reply.items():
            numeric = isinstance(values, list) and all(isinstance(v, (int, float)) for v in values)
            if key == "scores" and not (numeric and len(values) == count):
                raise ServiceError(f"{url}: 'scores' must be {count} numbers, got {str(values)[:200]}")
            if numeric and len(values) == count:
                columns[key] = [float(v) for v in values]
        return columns


@register("judge")
class JudgeReward(Reward):
    def __init__(
        self,
        url: str | None = None,
        model: str | None = None,
        template: str = JUDGE_TEMPLATE,
        pattern: str = JUDGE_PATTERN,
        scale: float = 1.0,
        api_key_env: str | None = None,
        max_tokens: int = 256,
        max_concurrency: int = 8,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 1.0,
    ) -> None:
        if not url or not model:
            raise ValueError("reward 'judge': set options.url (an OpenAI-compatible API) and options.model")
        _check_positive("judge", max_concurrency=max_concurrency, timeout=timeout, max_tokens=max_tokens)
        headers = {}
        if api_key_env is not None:
            if api_key_env not in os.environ:
                raise ValueError(f"reward 'judge': options.api_key_env names {api_key_env}, which is not set")
            headers["Authorization"] = f"Bearer {os.environ[api_key_env]}"
        endpoint = url if url.rstrip("/").endswith("/chat/completions") else url.rstrip("/") + "/chat/completions"
        self.client = JsonClient(endpoint, timeout=timeout, retries=retries, backoff=backoff, headers=headers)
        self.model, self.template, self.scale = model, template, scale
        self.pattern = re.compile(pattern)
        self.max_tokens, self.max_concurrency = max_tokens, max_concurrency

    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]]) -> RewardOutput:
        encoded = png_base64(images)
        scores = _in_parallel(self._judge, list(zip(encoded, prompts, strict=True)), self.max_concurrency)
        return RewardOutput(torch.tensor(scores, dtype=torch.float32))

    def _judge(self, item: tuple[str, str]) -> float:
        image, prompt = item
        content = [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
            {"type": "text", "text": self.template.format(prompt=prompt)},
        ]
        reply = self.client.post(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": content}],
                "max_tokens": self.max_tokens,
                "temperature": 0.0,
            }
        )
        try:
            text = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ServiceError(f"{self.client.url}: not a chat completion: {str(reply)[:200]}") from None
        found = self.pattern.search(text or "")
        if found is None:
            raise ServiceError(
                f"{self.client.url}: no score matching {self.pattern.pattern!r} in the reply {text[:200]!r}"
            )
        return float(found.group(1)) * self.scale

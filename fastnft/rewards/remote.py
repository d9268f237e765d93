"""Rewards computed by a service: `http` (a user's scorer, e.g. a GenEval or OCR server) and
`judge` (a vision-language model behind an OpenAI-compatible API, as the reference does for
UnifiedReward). Both send PNG images, run up to `max_concurrency` requests at once, give each
`timeout` seconds, retry failures `retries` times with exponential backoff (`backoff` seconds,
doubled each time), and fail with an error naming the URL when the service is down or its reply
is malformed. Their options are checked when the reward is built, at the start of a run.

Credentials never reach the run's records: they are read from environment variables whose names
the config holds (`http`: `headers_env`, header name -> variable; `judge`: `api_key_env`), and a
redirect to another origin (scheme, host, port) is refused rather than followed, so that they are
sent to the configured service only.

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
import math
import os
import re
import time
import urllib.error
import urllib.parse
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


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, parts.hostname or "", parts.port or {"http": 80, "https": 443}.get(parts.scheme)


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows a POST's 301/302/303 to any URL with every header, credentials included:
    this handler follows redirects within the request's origin only."""

    def redirect_request(
        self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        if _origin(newurl) != _origin(req.full_url):
            scheme, host, port = _origin(newurl)
            raise ServiceError(
                f"{req.full_url}: redirected (HTTP {code}) to another origin, {scheme}://{host}:{port}; "
                "not followed, so that the request's credentials go to the configured service only"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class JsonClient:
    """POSTs JSON with a timeout and bounded retries (connection errors, timeouts, HTTP 5xx and
    429 are retried; other HTTP errors, unreadable replies and cross-origin redirects are not)."""

    def __init__(self, url: str, *, timeout: float, retries: int, backoff: float, headers: dict[str, str]) -> None:
        self.url, self.timeout, self.retries, self.backoff = url, timeout, retries, backoff
        self.headers = {"Content-Type": "application/json", **headers}
        self.opener = urllib.request.build_opener(_SameOriginRedirects)

    def post(self, payload: dict[str, Any]) -> Any:
        body = json.dumps(payload).encode()
        failure = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
            try:
                with self.opener.open(request, timeout=self.timeout) as response:
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


def _check_number(reward: str, name: str, value: Any, *, low: float, strict: bool, integer: bool = False) -> None:
    """options.<name> is a finite number (an int when `integer`) above `low` (or equal, when not
    `strict`): checked at build, since a bad limit would fail only at the first batch."""
    kinds = int if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (value > low if strict else value >= low):
        kind = "an integer" if integer else "a number"
        raise ValueError(
            f"reward {reward!r}: options.{name} must be {kind} {'>' if strict else '>='} {low:g}; got {value!r}"
        )


def _check_limits(reward: str, *, timeout: Any, retries: Any, backoff: Any, **counts: Any) -> None:
    for name, value in counts.items():
        _check_number(reward, name, value, low=0, strict=True, integer=True)
    _check_number(reward, "timeout", timeout, low=0, strict=True)
    _check_number(reward, "retries", retries, low=0, strict=False, integer=True)
    _check_number(reward, "backoff", backoff, low=0, strict=False)


def _check_url(reward: str, url: Any, example: str) -> str:
    if not url:
        raise ValueError(f"reward {reward!r}: set options.url to {example}")
    parts = urllib.parse.urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        # Only the scheme is echoed: a URL may carry a token the user would not want in a log.
        scheme = f"scheme {parts.scheme!r}" if parts and parts.scheme else "no http(s) scheme and host"
        raise ValueError(
            f"reward {reward!r}: options.url must be an http:// or https:// URL with a host; it has {scheme}"
        )
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            f"reward {reward!r}: options.url holds credentials (user:password@), which config.yaml would keep in "
            "plain text; pass them in a header from the environment (options.headers_env)"
        )
    return url


def _env_headers(reward: str, headers_env: Any) -> dict[str, str]:
    """{header: value of the environment variable the config names}; errors name variables, never values."""
    if not isinstance(headers_env, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers_env.items()
    ):
        raise ValueError(f"reward {reward!r}: options.headers_env maps header names to environment variable names")
    missing = sorted(variable for variable in headers_env.values() if variable not in os.environ)
    if missing:
        raise ValueError(f"reward {reward!r}: options.headers_env names {', '.join(missing)}, which is not set")
    return {header: os.environ[variable] for header, variable in headers_env.items()}


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
        headers_env: dict[str, str] | None = None,
        headers: Any = None,
    ) -> None:
        url = _check_url("http", url, "the scoring service, e.g. http://localhost:8000/score")
        if headers is not None:  # the values would land in config.yaml, run.json and the command line
            raise ValueError(
                "reward 'http': options.headers would be written to config.yaml and run.json in plain text; "
                "name an environment variable for each header instead: options.headers_env: {Authorization: MY_VAR}"
            )
        _check_limits(
            "http",
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            batch_size=batch_size,
            max_concurrency=max_concurrency,
        )
        self.batch_size, self.max_concurrency = batch_size, max_concurrency
        headers = _env_headers("http", {} if headers_env is None else headers_env)
        self.client = JsonClient(url, timeout=timeout, retries=retries, backoff=backoff, headers=headers)

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
        if not url or not isinstance(model, str) or not model:
            raise ValueError("reward 'judge': set options.url (an OpenAI-compatible API) and options.model")
        url = _check_url("judge", url, "an OpenAI-compatible API")
        _check_limits(
            "judge",
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            max_concurrency=max_concurrency,
            max_tokens=max_tokens,
        )
        _check_number("judge", "scale", scale, low=-math.inf, strict=True)
        try:
            template.format(prompt="")  # a stray {field} would fail at the first image otherwise
        except (AttributeError, KeyError, IndexError, ValueError) as error:
            raise ValueError(f"reward 'judge': options.template must name {{prompt}} only: {error!r}") from None
        try:
            self.pattern = re.compile(pattern)
        except (TypeError, re.error) as error:
            raise ValueError(f"reward 'judge': options.pattern is not a regular expression: {error}") from None
        if self.pattern.groups < 1:
            raise ValueError(f"reward 'judge': options.pattern needs a group around the score, e.g. {JUDGE_PATTERN!r}")
        headers = {}
        if api_key_env is not None:
            if not isinstance(api_key_env, str) or api_key_env not in os.environ:
                raise ValueError(f"reward 'judge': options.api_key_env names {api_key_env}, which is not set")
            headers["Authorization"] = f"Bearer {os.environ[api_key_env]}"
        endpoint = url if url.rstrip("/").endswith("/chat/completions") else url.rstrip("/") + "/chat/completions"
        self.client = JsonClient(endpoint, timeout=timeout, retries=retries, backoff=backoff, headers=headers)
        self.model, self.template, self.scale = model, template, scale
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

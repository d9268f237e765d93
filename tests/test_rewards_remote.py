"""`http` and `judge` rewards against stub services on 127.0.0.1: success, retry, timeout,
malformed replies, a service that is down."""

import base64
import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from fastnft.rewards import build_reward
from fastnft.rewards.remote import ServiceError, png_base64


class Stub:
    """A scoring service whose behaviour a test sets: reply(payload) -> (status, body)."""

    def __init__(self, reply):
        self.reply = reply
        self.requests = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append((self.path, payload))
                status, body = stub.reply(payload)
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout tests)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    services = []

    def start(reply):
        services.append(Stub(reply))
        return services[-1]

    yield start
    for service in services:
        service.close()


def png_size(encoded: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(encoded))).size


IMAGES = torch.rand(5, 3, 12, 20)
PROMPTS = ["a", "bb", "ccc", "dddd", "eeeee"]
FAST = dict(retries=2, backoff=0.01, timeout=2.0)


def length_scores(payload):
    assert all(png_size(image) == (20, 12) for image in payload["images"])
    count = len(payload["prompts"])
    return 200, {"scores": [len(p) for p in payload["prompts"]], "accuracy": [1.0] * count, "note": "ignored"}


def test_http_scores_batches_in_order_with_extras(stub):
    service = stub(length_scores)
    reward = build_reward("http", url=service.url + "/score", batch_size=2, max_concurrency=3, **FAST)
    out = reward(IMAGES, PROMPTS, [{"i": i} for i in range(5)])
    assert out.score.tolist() == [1, 2, 3, 4, 5]
    assert out.extras["accuracy"].tolist() == [1.0] * 5 and "note" not in out.extras
    assert len(service.requests) == 3 and {path for path, _ in service.requests} == {"/score"}
    assert sorted(p["metadata"][0]["i"] for _, p in service.requests) == [0, 2, 4]


def test_http_retries_server_errors_then_succeeds(stub):
    failures = iter([503, 500])

    def flaky(payload):
        status = next(failures, 200)
        return (status, "busy") if status != 200 else length_scores(payload)

    service = stub(flaky)
    out = build_reward("http", url=service.url, batch_size=8, **FAST)(IMAGES, PROMPTS, [{}] * 5)
    assert out.score.tolist() == [1, 2, 3, 4, 5] and len(service.requests) == 3


def test_http_gives_up_after_its_retries_on_timeouts(stub):
    def slow(payload):
        time.sleep(0.6)
        return length_scores(payload)

    service = stub(slow)
    reward = build_reward("http", url=service.url, batch_size=8, retries=1, backoff=0.01, timeout=0.2)
    with pytest.raises(ServiceError, match=rf"{service.url}: timed out after 0.2 s \(after 2 attempts\)"):
        reward(IMAGES, PROMPTS, [{}] * 5)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("<html>oops</html>", "the reply is not JSON"),
        ({"result": [1, 2]}, "the reply has no 'scores'"),
        ({"scores": [1.0]}, "'scores' must be 5 numbers"),
        ({"scores": ["high"] * 5}, "'scores' must be 5 numbers"),
    ],
)
def test_http_malformed_replies_are_errors_naming_the_url(stub, body, message):
    service = stub(lambda payload: (200, body))
    with pytest.raises(ServiceError, match=message) as error:
        build_reward("http", url=service.url, batch_size=8, **FAST)(IMAGES, PROMPTS, [{}] * 5)
    assert service.url in str(error.value)
    assert len(service.requests) == 1  # a malformed reply is not retried


def test_http_client_errors_are_not_retried(stub):
    service = stub(lambda payload: (404, "no such route"))
    with pytest.raises(ServiceError, match="HTTP 404"):
        build_reward("http", url=service.url, **FAST)(IMAGES, PROMPTS, [{}] * 5)
    assert len(service.requests) == 1


def test_a_service_that_is_down_is_named():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/score"
    with pytest.raises(ServiceError, match=rf"{url}: unreachable .*\(after 3 attempts\)"):
        build_reward("http", url=url, **FAST)(IMAGES, PROMPTS, [{}] * 5)


def chat_reply(text):
    return {"choices": [{"message": {"role": "assistant", "content": text}}]}


def test_judge_asks_about_each_image_and_parses_the_score(stub, monkeypatch):
    def judge(payload):
        content = payload["messages"][0]["content"]
        image = next(part for part in content if part["type"] == "image_url")["image_url"]["url"]
        text = next(part for part in content if part["type"] == "text")["text"]
        assert image.startswith("data:image/png;base64,") and payload["model"] == "vlm"
        prompt = text.split('"')[1]
        return 200, chat_reply(f"Looks fine.\nFinal Score: {len(prompt)}.5")

    service = stub(judge)
    monkeypatch.setenv("JUDGE_KEY", "secret")
    reward = build_reward("judge", url=service.url + "/v1", model="vlm", scale=0.5, api_key_env="JUDGE_KEY", **FAST)
    out = reward(IMAGES, PROMPTS, [{}] * 5)
    assert out.score.tolist() == [0.75, 1.25, 1.75, 2.25, 2.75]
    assert {path for path, _ in service.requests} == {"/v1/chat/completions"}


def test_judge_replies_without_a_score_are_errors(stub):
    service = stub(lambda payload: (200, chat_reply("I cannot rate this image.")))
    with pytest.raises(ServiceError, match="no score matching"):
        build_reward("judge", url=service.url, model="vlm", **FAST)(IMAGES[:1], PROMPTS[:1], [{}])
    service.reply = lambda payload: (200, {"error": "overloaded"})
    with pytest.raises(ServiceError, match="not a chat completion"):
        build_reward("judge", url=service.url, model="vlm", **FAST)(IMAGES[:1], PROMPTS[:1], [{}])


def test_remote_options_are_checked():
    with pytest.raises(ValueError, match=r"set options\.url"):
        build_reward("http")
    with pytest.raises(ValueError, match=r"options\.model"):
        build_reward("judge", url="http://127.0.0.1:1")
    with pytest.raises(ValueError, match="NOT_SET_ANYWHERE, which is not set"):
        build_reward("judge", url="http://127.0.0.1:1", model="m", api_key_env="NOT_SET_ANYWHERE")


def test_images_are_sent_as_their_rounded_8_bit_pixels():
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(e)))) for e in png_base64(IMAGES)])
    assert np.array_equal(decoded, (IMAGES * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())

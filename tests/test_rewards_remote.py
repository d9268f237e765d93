"""`http` and `judge` rewards against stub services on 127.0.0.1: success, retry, timeout,
malformed replies, a service that is down, options checked at build, and credentials that stay
out of the run directory and off other origins."""

import base64
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from fastnft.cli import main
from fastnft.rewards import build_reward
from fastnft.rewards.remote import ServiceError, png_base64
from tests.helpers import TINY_CONFIG


class LocalServer:
    """An HTTP server on 127.0.0.1 (a free port) in a daemon thread."""

    def serve(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Stub(LocalServer):
    """A scoring service whose behaviour a test sets: reply(payload) -> (status, body)."""

    def __init__(self, reply):
        self.reply = reply
        self.requests = []
        self.headers = []  # each request's headers
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append((self.path, payload))
                stub.headers.append(dict(self.headers))
                status, body = stub.reply(payload)
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout tests)

            def do_GET(self):  # urllib turns a redirected POST into a GET: recorded, refused
                stub.headers.append(dict(self.headers))
                self.send_response(405)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.serve(Handler)


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


SECRET = "sk-fake-0123456789-do-not-log"


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("http", {"url": "http://127.0.0.1:1", "retries": -1}, r"options\.retries must be an integer >= 0"),
        ("http", {"url": "http://127.0.0.1:1", "timeout": "soon"}, r"options\.timeout must be a number > 0"),
        ("http", {"url": "ftp://127.0.0.1:1"}, "must be an http:// or https:// URL"),
        ("judge", {"url": "http://127.0.0.1:1", "model": "m", "pattern": "([0-9"}, "not a regular expression"),
        ("judge", {"url": "http://127.0.0.1:1", "model": "m", "pattern": "[0-9]+"}, "needs a group"),
        ("judge", {"url": "http://127.0.0.1:1", "model": "m", "template": "{image}"}, r"options\.template"),
    ],
)
def test_bad_remote_options_fail_when_the_reward_is_built(name, options, message):
    with pytest.raises(ValueError, match=message):
        build_reward(name, **options)


@pytest.mark.parametrize("options", [{"headers": {"Authorization": SECRET}}, {"headres": {"Authorization": SECRET}}])
def test_header_values_are_refused_without_being_echoed(options):
    with pytest.raises(ValueError) as error:
        build_reward("http", url="http://127.0.0.1:1", **options)
    assert SECRET not in str(error.value) and ("headers_env" in str(error.value) or "headres" in str(error.value))


def test_credentials_come_from_the_environment_and_never_reach_the_run_directory(stub, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTNFT_TEST_TOKEN", SECRET)
    monkeypatch.setenv("FASTNFT_TEST_KEY", SECRET)
    scorer = stub(lambda payload: (200, {"scores": [1.0] * len(payload["images"])}))
    judge = stub(lambda payload: (200, chat_reply("Final Score: 3")))
    rewards = [
        {"name": "http", "options": {"url": scorer.url, "headers_env": {"Authorization": "FASTNFT_TEST_TOKEN"}}},
        {"name": "judge", "options": {"url": judge.url, "model": "vlm", "api_key_env": "FASTNFT_TEST_KEY", **FAST}},
    ]
    out = tmp_path / "run"
    overrides = ["eval.every=0", "logging.progress=false", f"rewards={json.dumps(rewards)}"]
    assert main(["train", str(TINY_CONFIG), "--out", str(out), "--iterations", "1", *overrides]) == 0
    assert {headers["Authorization"] for headers in scorer.headers} == {SECRET}  # the credentials were sent
    assert {headers["Authorization"] for headers in judge.headers} == {f"Bearer {SECRET}"}
    written = [path for path in out.rglob("*") if path.is_file()]
    assert any(path.name == "config.yaml" for path in written) and any(path.name == "run.json" for path in written)
    assert [path for path in written if SECRET.encode() in path.read_bytes()] == []
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err


class Redirector(LocalServer):
    """A service that answers every POST with a redirect to `target`."""

    def __init__(self, code: int, target: str) -> None:
        self.requests = 0
        redirector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                redirector.requests += 1
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(code)
                self.send_header("Location", target)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.serve(Handler)


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
@pytest.mark.parametrize("name", ["judge", "http"])
def test_credentials_never_follow_a_redirect_to_another_origin(stub, monkeypatch, code, name):
    """Two services on 127.0.0.1, so two origins (their ports differ): the first redirects every
    request to the second, which must never see one. (urllib on its own follows a POST's 301, 302
    and 303 with every header, the key included.)"""
    monkeypatch.setenv("FASTNFT_TEST_KEY", SECRET)
    other = stub(lambda payload: (200, chat_reply("Final Score: 5")))
    redirector = Redirector(code, other.url + "/v1/chat/completions")
    try:
        if name == "judge":
            options = {"model": "vlm", "api_key_env": "FASTNFT_TEST_KEY"}
        else:
            options = {"headers_env": {"Authorization": "FASTNFT_TEST_KEY"}}
        reward = build_reward(name, url=redirector.url, **options, **FAST)
        with pytest.raises(ServiceError, match=rf"redirected \(HTTP {code}\) to another origin, http://127\.0\.0\.1:"):
            reward(IMAGES[:1], PROMPTS[:1], [{}])
        assert redirector.requests == 1 and other.requests == [] and other.headers == []  # refused, not retried
        if code in (301, 302, 303):  # the control: urllib's own redirect handler hands the key on
            request = urllib.request.Request(redirector.url, data=b"{}", headers={"Authorization": SECRET})
            with pytest.raises(urllib.error.HTTPError, match="405"):
                urllib.request.urlopen(request, timeout=2.0)
            assert [headers["Authorization"] for headers in other.headers] == [SECRET]
    finally:
        redirector.close()

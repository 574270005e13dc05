"""Downloading Keras weight files: verified before placing, resumed, locked, offline, and
one-line errors for every failure.

A threaded http.server on 127.0.0.1 serves a VGG16 notop file written in Keras's legacy HDF5
layout by test_pretrained's writer (Keras itself needs ~15 s to build VGG16 here; its own
files are checked against ours in test_pretrained). CXR_ENSEMBLES_WEIGHTS_URL points at the
server, CXR_ENSEMBLES_WEIGHTS at a fresh folder, and the official MD5 of vgg16's notop file is
patched to the served file's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import socket
import threading
import time
import warnings

import numpy as np
import pytest
from keras_files import abstract_variables, random_like, write_legacy_h5

from backbones import load_pretrained, pretrained, weights
from backbones.__main__ import main
from backbones.weights import WeightsDownloadError, fetch, list_cached
from ensembles.config import ConfigError, make_config
from ensembles.training import build

NAME = "vgg16"
FILE = pretrained.keras_file_name(NAME, include_top=False)
URL_PATH = f"/mirror/vgg16/{FILE}"


@dataclasses.dataclass
class Behaviour:
    """What the test server does; reset for every test."""

    files: dict[str, bytes]
    requests: list[tuple[str, str | None]] = dataclasses.field(default_factory=list)
    honour_range: bool = True
    truncate_to: int | None = None   # send this many bytes under the full Content-Length
    delay_s: float = 0.0


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        behaviour: Behaviour = self.server.behaviour
        behaviour.requests.append((self.path, self.headers.get("Range")))
        time.sleep(behaviour.delay_s)
        body = behaviour.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if self.headers.get("Range") and behaviour.honour_range:
            start = int(self.headers["Range"].removeprefix("bytes=").removesuffix("-"))
            if start >= len(body):
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:start + (behaviour.truncate_to or len(body))])
        self.close_connection = True  # a truncated body ends with the connection

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def weight_file(tmp_path_factory) -> tuple[bytes, dict]:
    """A VGG16 notop weight file's bytes and the trunk variables it holds."""
    _, abstract = abstract_variables(NAME, 32, num_classes=None, head="features")
    variables = random_like(abstract)
    path = write_legacy_h5(tmp_path_factory.mktemp("w") / FILE, variables)
    return path.read_bytes(), variables


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def env(server, weight_file, tmp_path, monkeypatch):
    """The server's behaviour (serving the good file), the cache folder, the target path."""
    body, _ = weight_file
    server.behaviour = Behaviour(files={URL_PATH: body})
    cache = tmp_path / "cache"
    monkeypatch.setenv("CXR_ENSEMBLES_WEIGHTS", str(cache))
    monkeypatch.setenv("CXR_ENSEMBLES_WEIGHTS_URL",
                       f"http://127.0.0.1:{server.server_port}/mirror/")
    monkeypatch.delenv("CXR_ENSEMBLES_OFFLINE", raising=False)
    set_md5(monkeypatch, hashlib.md5(body).hexdigest())
    return server.behaviour, cache, cache / FILE


def set_md5(monkeypatch, notop_md5: str) -> None:
    spec = pretrained.KERAS[NAME]
    monkeypatch.setitem(pretrained.KERAS, NAME,
                        dataclasses.replace(spec, md5=(spec.md5[0], notop_md5)))


def one_line_error(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_downloads_verifies_places_and_reuses(env, weight_file):
    behaviour, cache, target = env
    body, variables = weight_file
    assert fetch(NAME, include_top=False, progress=False) == target
    assert target.read_bytes() == body
    assert sorted(cache.iterdir()) == [target]  # no .part, no .lock left
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # official (patched) MD5: no warning
        loaded = load_pretrained(NAME, include_top=False)
    np.testing.assert_array_equal(loaded["params"]["block5_conv3"]["kernel"],
                                  variables["params"]["block5_conv3"]["kernel"])
    assert fetch(NAME, include_top=False, progress=False) == target
    assert behaviour.requests == [(URL_PATH, None)]  # the second call never asked the server
    [entry] = list_cached()
    assert (entry.name, entry.include_top, entry.size, entry.verified) == (
        NAME, False, len(body), True)


def test_check_weights_downloads_imagenet_but_refuses_a_missing_path(env, tmp_path):
    behaviour, _, target = env
    config = make_config("ova", backbone=NAME, pretrained="imagenet", progress=False)
    build.check_weights(config)
    assert build.weights_path(config) == target and target.is_file()
    assert len(behaviour.requests) == 1
    missing = make_config("ova", backbone=NAME, pretrained=str(tmp_path / "nope.h5"))
    with pytest.raises(ConfigError, match="nope.h5 is not a file"):
        build.check_weights(missing)
    assert len(behaviour.requests) == 1


def test_wrong_hash_places_nothing(env, monkeypatch):
    _, cache, _ = env
    set_md5(monkeypatch, "0" * 32)
    with pytest.raises(WeightsDownloadError) as error:
        fetch(NAME, include_top=False, progress=False)
    assert "is not the official Keras hash " + "0" * 32 in one_line_error(error)
    assert list(cache.iterdir()) == []
    assert list_cached() == []


def test_truncated_transfer_fails_then_resumes(env, weight_file):
    behaviour, cache, target = env
    body, _ = weight_file
    behaviour.truncate_to = len(body) // 3
    with pytest.raises(WeightsDownloadError) as error:
        fetch(NAME, include_top=False, progress=False)
    assert f"stopped at {len(body) // 3} of {len(body)} bytes" in one_line_error(error)
    assert not target.exists() and list_cached() == []
    behaviour.truncate_to = None
    assert fetch(NAME, include_top=False, progress=False).read_bytes() == body
    assert behaviour.requests[1] == (URL_PATH, f"bytes={len(body) // 3}-")
    assert sorted(cache.iterdir()) == [target]


def test_partial_file_resumed_with_range(env, weight_file):
    behaviour, cache, target = env
    body, _ = weight_file
    cache.mkdir()
    target.with_name(FILE + ".part").write_bytes(body[:12345])
    assert fetch(NAME, include_top=False, progress=False).read_bytes() == body
    assert behaviour.requests == [(URL_PATH, "bytes=12345-")]
    assert list_cached()[0].verified


def test_server_without_ranges_restarts_cleanly(env, weight_file):
    behaviour, cache, target = env
    body, _ = weight_file
    behaviour.honour_range = False
    cache.mkdir()
    target.with_name(FILE + ".part").write_bytes(b"not the start of the file")
    assert fetch(NAME, include_top=False, progress=False).read_bytes() == body
    assert behaviour.requests == [(URL_PATH, "bytes=25-")]  # asked, got 200, started over


def test_404_names_the_url(env, server):
    behaviour, cache, _ = env
    behaviour.files.clear()
    with pytest.raises(WeightsDownloadError) as error:
        fetch(NAME, include_top=False, progress=False)
    message = one_line_error(error)
    assert f"http://127.0.0.1:{server.server_port}/mirror/vgg16/{FILE} (HTTP 404" in message
    assert f"put {FILE} into {cache} by hand" in message
    assert list(cache.iterdir()) == []


def test_offline_never_asks(env, monkeypatch):
    behaviour, cache, target = env
    monkeypatch.setenv("CXR_ENSEMBLES_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as error:
        fetch(NAME, include_top=False, progress=False)
    message = one_line_error(error)
    assert message.startswith(f"{target} not found and CXR_ENSEMBLES_OFFLINE is set")
    assert f"/mirror/vgg16/{FILE} into {cache}" in message
    assert behaviour.requests == [] and not cache.exists()


def fetch_error(errors: list[Exception]) -> None:
    try:
        fetch(NAME, include_top=False, progress=False)
    except Exception as error:  # noqa: BLE001 - the caller checks its type
        errors.append(error)


def test_refused_and_silent_servers_fail_fast(env, monkeypatch):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # closed on leaving: connections are refused
    silent = socket.socket()  # listens but never answers: the read times out
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    monkeypatch.setattr(weights, "TIMEOUT_S", 0.5)
    try:
        for port, reason in ((port, "refused"), (silent.getsockname()[1], "timed out")):
            monkeypatch.setenv("CXR_ENSEMBLES_WEIGHTS_URL", f"http://127.0.0.1:{port}")
            errors: list[Exception] = []
            thread = threading.Thread(target=fetch_error, args=(errors,), daemon=True)
            thread.start()
            thread.join(timeout=10)  # a hang fails here rather than stalling the suite
            assert not thread.is_alive(), "fetch did not give up within 10 s"
            [error] = errors
            assert isinstance(error, WeightsDownloadError) and "\n" not in str(error)
            message = str(error)
            assert f"cannot download http://127.0.0.1:{port}/vgg16/{FILE}" in message
            assert reason in message
    finally:
        silent.close()


def test_concurrent_fetches_download_once(env, weight_file):
    behaviour, cache, target = env
    body, _ = weight_file
    behaviour.delay_s = 0.3  # the second fetch arrives while the first downloads
    results: list = []

    def run():
        results.append(fetch(NAME, include_top=False, progress=False))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [target, target] and target.read_bytes() == body
    assert len(behaviour.requests) == 1
    assert sorted(cache.iterdir()) == [target]


def test_cli_download_and_list(env, capsys, monkeypatch):
    _, cache, target = env
    assert main(["weights", "download", NAME, "--no-progress"]) == 0
    assert capsys.readouterr().out == f"{target}\n"
    (cache / pretrained.keras_file_name("vgg19", include_top=True)).write_bytes(b"x" * 2**20)
    assert main(["weights", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{cache}: 2 weight files"
    assert lines[1].startswith(FILE) and lines[1].endswith("official MD5")
    assert lines[2].endswith("1.0 MiB  MD5 NOT official")

    for argv in (["download", "resnet18"], ["download"]):
        assert main(["weights", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ")
    target.unlink()
    set_md5(monkeypatch, "0" * 32)
    assert main(["weights", "download", NAME, "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert "is not the official Keras hash" in captured.err
    assert not target.exists()


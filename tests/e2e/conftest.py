"""A real inference server for the end-to-end tests: llama.cpp's `llama-server` on a tiny
random-weight model the tests write themselves (tests/e2e/tiny_model.py).

Two servers start once per session: one generating (`--ignore-eos`, so with temperature 0
every request generates exactly its bound) and one serving embeddings. Both expose their
own Prometheus counters, the referee of every billing assertion here.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.e2e import llama_build, tiny_model

MODEL_ALIAS = "tiny-llama"


@dataclass
class LlamaServer:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def counter(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        match = re.search(rf"^llamacpp:{name} (\S+)$", text, re.M)
        assert match is not None, f"llamacpp:{name} missing from /metrics"
        return float(match.group(1))

    def counters(self) -> tuple[int, int, int]:
        """(prompt tokens evaluated, prompt tokens reused from the cache, tokens generated)
        so far, as the server counts them."""
        return (int(self.counter("prompt_tokens_total")),
                int(self.counter("prompt_tokens_cached_total")),
                int(self.counter("tokens_predicted_total")))

    def settled(self, timeout: float = 10.0) -> tuple[int, int, int]:
        """The counters once the server is idle (a cancelled request counts when its slot
        is released)."""
        deadline = time.monotonic() + timeout
        last = self.counters()
        while time.monotonic() < deadline:
            time.sleep(0.3)
            now = self.counters()
            idle = "requests_processing 0" in httpx.get(f"{self.url}/metrics").text.replace(
                "llamacpp:", "")
            if now == last and idle:
                return now
            last = now
        return last


def _binary() -> Path:
    binary = llama_build.binary_path()
    if binary.exists():
        return binary
    reason = llama_build.failure_reason()
    if reason:
        pytest.skip(f"llama-server could not be built here: {reason}")
    try:
        return llama_build.build()
    except (OSError, RuntimeError) as exc:
        pytest.skip(f"llama-server could not be built here: {exc}")


def _start(directory: Path, model: Path, *extra: str) -> LlamaServer:
    port = free_port()
    log = directory / f"llama-{port}.log"
    args = [str(_binary()), "-m", str(model), "--alias", MODEL_ALIAS, "--host", "127.0.0.1",
            "--port", str(port), "--metrics", "--no-webui", "--offline", "-t", "1", *extra]
    with open(log, "wb") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    server = LlamaServer(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llama-server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"llama-server did not start: {log.read_text()[-2000:]}")


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model.write(tmp_path_factory.mktemp("model") / "tiny.gguf")


@pytest.fixture(scope="session")
def llama(tmp_path_factory: pytest.TempPathFactory, tiny_gguf: Path) -> Iterator[LlamaServer]:
    server = _start(tmp_path_factory.mktemp("llama"), tiny_gguf, "--ignore-eos",
                    "-np", "4", "-c", "8192")
    yield server
    server.process.terminate()
    server.process.wait(timeout=10)


@pytest.fixture(scope="session")
def llama_embeddings(tmp_path_factory: pytest.TempPathFactory,
                     tiny_gguf: Path) -> Iterator[LlamaServer]:
    server = _start(tmp_path_factory.mktemp("llama-emb"), tiny_gguf, "--embeddings",
                    "--pooling", "mean", "-np", "2", "-c", "4096")
    yield server
    server.process.terminate()
    server.process.wait(timeout=10)

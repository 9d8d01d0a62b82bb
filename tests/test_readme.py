"""The README's runnable examples (each ```bash block after `<!-- readme-test: run -->`), run
in order in one bash session against a real `gateway serve`, its own redis-server and the
mock upstream, as an operator would paste them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import RedisServer
from tests.processes import Process, gateway_serve, mock_upstream

README = Path(__file__).resolve().parents[1] / "README.md"
ADMIN_TOKEN = "readme-admin-token-0123456789"
MARK = "<!-- readme-test: run -->"


def runnable_blocks() -> list[str]:
    text = README.read_text()
    return re.findall(re.escape(MARK) + r"\n```bash\n(.*?)\n```", text, re.DOTALL)


@pytest.fixture(scope="module")
def served(redis_server: RedisServer) -> Iterator[tuple[Process, str]]:
    upstream = mock_upstream()
    [gateway] = gateway_serve(upstream.url, redis_server.url,
                              env={"GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN})
    yield gateway, redis_server.url
    gateway.terminate()
    upstream.terminate()


def test_the_readme_marks_its_runnable_examples() -> None:
    blocks = runnable_blocks()
    assert len(blocks) == 2 and all(block.strip() for block in blocks)


def test_the_readmes_examples_run_as_written(served: tuple[Process, str]) -> None:
    gateway, redis_url = served
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env.update({"GW": gateway.url, "GATEWAY_REDIS_URL": redis_url,
                "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN,
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"})
    outputs = []
    for block in runnable_blocks():
        # -e: a failing command fails the block; one session per block, in order
        done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", block], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (block, done.stdout, done.stderr)
        assert "Traceback" not in done.stderr, done.stderr
        outputs.append(done.stdout.splitlines())
    first, operator = outputs
    codes = [line for line in first if re.fullmatch(r"\d{3}", line)]
    assert codes == ["200", "200", "429", "200", "401"], first
    assert any("[deleted]" in line for line in first)
    assert any("invoice 2026-11" in line for line in first)  # the credit's reason, recorded
    assert operator[-1] == "401"
    assert '"credits":10.0' in operator[0]
    assert '"type":"credit"' in operator[1] and "sk_live_" not in operator[1]

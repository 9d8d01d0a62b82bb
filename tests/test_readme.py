"""The README, run as a new operator would run it (README "About the examples").

Every ```bash block runs, in order, as one shell session against the gateway and mock upstream
that the README's own background block starts, on a private redis-server: the addresses the
README names (127.0.0.1:6379, :8000, :8080, :9464) are swapped for this run's. A ```text block
marked `<!-- doctest: output -->` is the expected output of the block before it. The Quick
start is checked against a real `gateway demo`; ```sh blocks (hosts and containers this
machine lacks) have each `gateway` command parsed by the real CLI; ```python blocks run or
compile; ```toml blocks load as settings; ```json blocks parse.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gateway.config import ledger as ledger_settings
from gateway.config import settings as settings_module
from gateway.config.settings import Settings
from tests.conftest import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LANGUAGES = {"bash", "sh", "text", "toml", "json", "python", "mermaid"}
README_REDIS = "redis://127.0.0.1:6379/0"
PORTS = ("8080", "8000", "9464")  # the gateway's, the upstream's, the metrics listener's
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
MARK = re.compile(r"<!--\s*doctest:\s*(.*?)\s*-->\s*$")


@dataclass
class Block:
    lang: str
    body: str
    mark: str  # the `<!-- doctest: ... -->` right above the fence, or ""
    line: int

    def where(self) -> str:
        return f"README.md line {self.line}"


def blocks(text: str | None = None) -> list[Block]:
    text = README.read_text() if text is None else text
    found: list[Block] = []
    for match in FENCE.finditer(text):
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = MARK.search(before)
        found.append(Block(match.group(1).strip(), match.group(2), mark.group(1) if mark else "",
                           text.count("\n", 0, match.start()) + 1))
    return found


def section(title: str) -> str:
    return README.read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


class Addresses:
    """This run's stand-ins for the addresses the README names."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.ports = {port: str(free_port()) for port in PORTS}

    def __call__(self, text: str) -> str:
        text = text.replace(README_REDIS, self.redis_url)
        for port, ours in self.ports.items():
            text = re.sub(rf"(?<![\d.]){port}(?!\d)", ours, text)
        assert "6379" not in text, "an example would reach a Redis the test did not start"
        return text


def expected_output(pattern: str) -> re.Pattern[str]:
    """`…` stands for anything within a line; a line of `…` alone for any lines."""
    parts = []
    for line in pattern.rstrip("\n").split("\n"):
        if line.strip() == "…":
            parts.append(r"(?:[^\n]*\n)*?")
        else:
            parts.append("[^\n]*".join(re.escape(p) for p in line.split("…")) + r"\n")
    return re.compile("".join(parts))


def matches(pattern: str, output: str) -> bool:
    return expected_output(pattern).fullmatch(output if output.endswith("\n") else output + "\n") \
        is not None


def shell_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return env


def assigned_names(text: str) -> list[str]:
    return sorted(set(re.findall(r"(?:^|[\s;(])(?:export\s+)?([A-Za-z_]\w*)=", text, re.M)))


# -- the README's form ----------------------------------------------------------------------


def test_every_block_says_what_it_is_and_the_marks_are_known() -> None:
    found = blocks()
    assert found, "no code blocks found"
    for block in found:
        assert block.lang in LANGUAGES, f"{block.where()}: a fence needs one of {LANGUAGES}"
        assert block.mark == "" or re.match(
            r"(setup|background http\S+( http\S+)*|output|output of gateway demo|"
            r"compile-only \(.+\))$", block.mark), f"{block.where()}: unknown mark {block.mark!r}"
        if block.mark.startswith("output"):
            assert block.lang == "text", block.where()
        if block.mark.startswith(("background", "setup")):
            assert block.lang == "bash", block.where()
    text = README.read_text()
    assert "DESIGN.md" not in text
    anchors = {re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
               for title in re.findall(r"^#+ (.+)$", FENCE.sub("", text), re.M)}
    for anchor in re.findall(r"\]\(#([\w-]+)\)", text):
        assert anchor in anchors, f"README links #{anchor}, which no heading makes"
    for link in re.findall(r"\]\(((?:docs/|deploy/)?[\w./-]+\.md|LICENSE|CHANGELOG\.md)", text):
        assert (ROOT / link).exists(), f"README links {link}, which is missing"


def test_the_diagram_shows_the_request_path() -> None:
    [diagram] = [b.body for b in blocks() if b.lang == "mermaid"]
    assert diagram.startswith("flowchart")
    for part in ("admit.lua", "settle.lua", "forward", "read usage", "Redis", "Cluster",
                 "gateway CLI", "/admin/*", "Prometheus", "vLLM"):
        assert part in diagram, part
    assert diagram.count("[") == diagram.count("]") and diagram.count("(") == diagram.count(")")


def test_the_configuration_reference_lists_every_key_and_variable_with_its_default() -> None:
    reference = section("Configuration")
    keys = (set(settings_module._TOP_LEVEL) | settings_module._PLAN_FIELDS
            | settings_module._PRICING_FIELDS | settings_module._MODEL_FIELDS
            | settings_module._ROUTE_FIELDS | set(ledger_settings._FIELDS)
            | {"url", "api_key", "continuous_usage", "timings_per_token"}) - {
                "plans", "credit", "pricing", "routes", "upstream", "ledger"}
    for key in sorted(keys):
        assert f"`{key}`" in reference or f" {key}`" in reference, f"{key} is not documented"
    for table in ("[plans.SLUG]", "[credit]", "[pricing]", "[pricing.models.", "[upstream]",
                  "[routes.", "[ledger]"):
        assert table in reference, table
    source = "\n".join(p.read_text() for p in (ROOT / "gateway").rglob("*.py"))
    variables = set(re.findall(r"GATEWAY_[A-Z][A-Z_]*[A-Z]", source))
    # GATEWAY_{name.upper()}: the deadlines the environment may override
    variables |= {f"GATEWAY_{name.upper()}" for name in
                  re.findall(r'deadline\("(\w+)"', (ROOT / "gateway/config/settings.py")
                             .read_text())}
    for variable in sorted(variables):
        assert variable in reference, f"{variable} is not documented"
    # The defaults in the table are the gateway's.
    defaults = Settings.from_mapping({})
    rows = re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", reference, re.M)
    attribute = {"redis_timeout": "redis_timeout_seconds",
                 "upstream_connect_timeout": "upstream_deadlines.connect",
                 "upstream_first_byte_timeout": "upstream_deadlines.first_byte",
                 "upstream_idle_timeout": "upstream_deadlines.idle",
                 "max_header_bytes": "server_limits.header_bytes",
                 "header_timeout": "server_limits.header_timeout",
                 "body_timeout": "server_limits.body_timeout",
                 "max_connections": "server_limits.connections"}
    checked = 0
    for key, default in rows:
        value: object = defaults
        for name in attribute.get(key, key).split("."):
            value = getattr(value, name, None)
        if isinstance(value, bool):
            assert default == str(value).lower(), key
        elif isinstance(value, int | float):
            assert float(default) == value, key
        elif isinstance(value, str):
            assert default == f'"{value}"', key
        elif isinstance(value, tuple):
            assert json.loads(default) == list(value), key
        else:
            continue
        checked += 1
    assert checked >= 20, rows


def test_the_toml_and_json_blocks_are_what_they_say() -> None:
    for block in blocks():
        if block.lang == "toml":
            Settings.from_mapping(tomllib.loads(block.body))
        elif block.lang == "json":
            json.loads(block.body)


def test_the_sh_blocks_are_commands_the_cli_accepts() -> None:
    from gateway.serve.cli import _parser

    parsed = 0
    for block in (b for b in blocks() if b.lang == "sh"):
        for command in block.body.replace("\\\n", " ").splitlines():
            words = shlex.split(command, comments=True)
            if words and words[0] == "gateway":
                _parser().parse_args(words[1:])  # a mistake exits (SystemExit) and fails
                parsed += 1
    assert parsed >= 2


def test_the_python_blocks_run_or_compile() -> None:
    python = [b for b in blocks() if b.lang == "python"]
    assert python
    driver = """
import asyncio, httpx
from gateway.http.admin import KeySpec, create_key, resolve_account

async def main():
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        print((await client.get("/healthz")).status_code)
        account = await resolve_account(app.store, None)
        _, secret = await create_key(app.store, app.settings, account,
                                     KeySpec(name="readme", plan="standard"))
        answer = await client.post("/v1/chat/completions", json={
            "model": "mock-model", "messages": [{"role": "user", "content": "Hello!"}],
            "max_tokens": 4}, headers={"Authorization": f"Bearer {secret}"})
        print(answer.status_code, answer.json()["usage"]["completion_tokens"])
        usage = await client.get("/v1/usage", headers={"Authorization": f"Bearer {secret}"})
        print(usage.json()["budget"]["spent"] > 0)

asyncio.run(main())
"""
    for block in python:
        compile(block.body, block.where(), "exec")
        if block.mark.startswith("compile-only"):
            continue
        done = subprocess.run([sys.executable, "-c", block.body + driver], cwd=ROOT,
                              env=shell_env(), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (block.where(), done.stderr)
        assert done.stdout.split() == ["200", "200", "4", "True"], done.stdout
    for module, name in re.findall(r"--http ([\w.]+):(\w+)", README.read_text()):
        __import__(module)
        assert hasattr(sys.modules[module], name), f"{module}:{name}"


# -- the Quick start ------------------------------------------------------------------------


def test_the_quick_start_is_two_commands_and_the_demo_prints_what_the_readme_shows() -> None:
    [setup] = [b for b in blocks() if b.mark == "setup"]
    commands = [line for line in setup.body.splitlines() if line and not line.startswith("#")]
    assert commands == [
        "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/gateway demo",
        "./scripts/test"]
    script = ROOT / "scripts/test"
    assert os.access(script, os.X_OK) and "pytest" in script.read_text()
    assert 'gateway = "gateway.serve.cli:main"' in (ROOT / "pyproject.toml").read_text()

    [shown] = [b for b in blocks() if b.mark == "output of gateway demo"]
    port = free_port()
    demo = subprocess.Popen([sys.executable, "-m", "gateway", "demo", "--port", str(port)],
                            cwd=ROOT, env=shell_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    assert demo.stdout is not None
    printed = b""
    try:
        deadline = time.monotonic() + 30
        while b"/api/plans" not in printed and time.monotonic() < deadline:
            if select.select([demo.stdout], [], [], 0.5)[0]:
                printed += os.read(demo.stdout.fileno(), 65536)
            assert demo.poll() is None, "gateway demo exited"
    finally:
        demo.send_signal(signal.SIGTERM)
        demo.wait(timeout=30)
        demo.stdout.close()
    expected = shown.body.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
    assert matches(expected, printed.decode().rstrip("\n") + "\n"), printed.decode()


# -- the walk-through, against a real gateway serve ----------------------------------------


class Session:
    """The README's bash blocks as one shell session; background blocks as processes."""

    def __init__(self, tmp: Path, addresses: Addresses) -> None:
        self.tmp = tmp
        self.addresses = addresses
        self.state = tmp / "state.sh"
        self.env = shell_env()
        self.background: list[tuple[subprocess.Popen[bytes], Path]] = []
        self.names = assigned_names("\n".join(b.body for b in blocks() if b.lang == "bash"))

    def start(self, block: Block) -> None:
        log = self.tmp / f"background-{len(self.background)}.log"
        env = {**self.env, "GATEWAY_METRICS_PORT": self.addresses.ports["9464"]}
        with log.open("wb") as out:
            process = subprocess.Popen(["bash", "-c", self.addresses(block.body)], cwd=ROOT,
                                       env=env, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        self.background.append((process, log))
        for url in block.mark.split()[1:]:
            self._wait(self.addresses(url), process, log)

    def _wait(self, url: str, process: subprocess.Popen[bytes], log: Path) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert process.poll() is None, f"background block exited: {log.read_text()[-3000:]}"
            try:
                if httpx.get(url, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"{url} never answered: {log.read_text()[-3000:]}")

    def run(self, block: Block) -> str:
        save = (f"{{ declare -p {' '.join(self.names)} 2>/dev/null || true; declare -f; }}"
                f" > {shlex.quote(str(self.state))}")
        script = (f"set -euo pipefail\n[ ! -f {shlex.quote(str(self.state))} ] || "
                  f"source {shlex.quote(str(self.state))}\n"
                  f"{self.addresses(block.body)}\n{save}\n")
        done = subprocess.run(["bash", "-c", script], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (f"{block.where()} failed ({done.returncode}):\n"
                                      f"{block.body}\nstdout:\n{done.stdout}\n"
                                      f"stderr:\n{done.stderr}\n{self.logs()}")
        assert "Traceback" not in done.stderr, done.stderr
        return done.stdout

    def logs(self) -> str:
        return "\n".join(log.read_text()[-2000:] for _, log in self.background)

    def stop(self) -> None:
        for process, _ in self.background:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process, _ in self.background:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
            # the session's other members (the mock upstream started with &)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture
def session(tmp_path: Path, redis_url: str, redis_server: RedisServer) -> Iterator[Session]:
    shell = Session(tmp_path, Addresses(redis_url))
    try:
        yield shell
    finally:
        shell.stop()


def test_the_readmes_examples_run_as_written(session: Session) -> None:
    found = blocks()
    shell = [b for b in found if b.lang == "bash" and b.mark != "setup"]
    assert sum(b.mark.startswith("background") for b in shell) == 1
    assert len(shell) >= 10
    ran = checked = 0
    for index, block in enumerate(found):
        if block.lang != "bash" or block.mark == "setup":
            continue
        if block.mark.startswith("background"):
            session.start(block)
            continue
        output = session.run(block)
        ran += 1
        following = found[index + 1] if index + 1 < len(found) else None
        if following is not None and following.mark == "output":
            expected = session.addresses(following.body)
            assert matches(expected, output), (
                f"{block.where()} printed:\n{output}\nthe README says "
                f"({following.where()}):\n{following.body}")
            checked += 1
    assert ran == len(shell) - 1 and checked >= 8


def test_the_command_line_reference_names_every_command() -> None:
    import argparse

    from gateway.serve.cli import _parser

    def actions(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}

    reference = section("Command line")
    for group, parser in actions(_parser()).items():
        children = actions(parser)
        for command in ([f"{group} {c}" for c in children] if children else [group]):
            assert re.search(rf"gateway {command}\b", reference), f"gateway {command}"

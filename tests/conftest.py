from __future__ import annotations

import contextlib
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kdray.serving.launch import free_port

# The suite's processes share the cores with the other xdist worker's: OpenMP threads that spin
# while they wait for work (libgomp's default) then steal the CPU from the other worker's
# threads. Measured on 2 cores: two DenseNet121 forward loops at 2 threads each took 10x their
# time alone (5.4 s against 0.55 s), with OMP_WAIT_POLICY=PASSIVE 1.7x. Set before torch loads
# libgomp, inherited by every process the tests start (pipelines, Ray workers, Serve, benchmarks);
# processes that set no thread count of their own get their share of the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402  (after the OpenMP settings above)

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SERVE_TOKEN = "kdray-test-token"

# Tests share the machine with other work: keep torch to one thread unless a test says otherwise.
torch.set_num_threads(1)


# The longest tests outside the smoke group (minutes each on 2 cores), started first: xdist hands
# out work in collection order (after its largest group), and one of these started last would
# run alone while the other worker idles.
LONGEST_FIRST = (
    "test_resume.py",
    "test_cluster.py",
    "test_benchmarks.py",
    "test_teacher.py",
    "test_serve_ops.py",
)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups into the test ids
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (``make test``: ``-n 2 --dist loadgroup``), every test that reads the
    smoke pipeline's workspace or its served app runs on one worker, so the session's smoke run
    and service start once, not once per worker; the longest other tests go first."""
    for item in items:
        if {"smoke_run", "served"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group("smoke-workspace"))

    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order


@pytest.fixture()
def workspace(tmp_path: Path):
    from kdray.workspace import Workspace

    return Workspace(tmp_path / "ws").create()


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One real local Ray for the in-process integration tests, in its own temp dir."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # test-only: local cluster without tokens
    temp_dir = f"/tmp/kdray-test-ray-{os.getpid()}"
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=temp_dir,
        log_to_driver=False,
    )
    yield
    ray.shutdown()


def tiny_data(dataset: str = "eye_disease", n_per_class: int = 8, size: int = 32, seed: int = 0):
    """Synthetic data in memory: half train, a quarter each val and test, masks included."""
    from kdray.data.prepare import in_memory_synthetic

    return in_memory_synthetic(dataset, n_per_class, size, seed)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess that must not join another Ray, MLflow or workspace."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "KDRAY_HOME")
    }
    return {**env, **extra}


@contextlib.contextmanager
def mlflow_server(store: str, log_path: Path, *extra: str) -> Iterator[str]:
    """A real ``mlflow server`` on 127.0.0.1 over ``store``, in its own process group: yields its
    base URL once ``/health`` answers, stops it after."""
    port = free_port()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                str(BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                store,
                *extra,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            env=clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:  # its workers finish open requests first: the tests' data is thrown away anyway
            proc.wait(3)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture()
def browser():
    """Debian's headless chromium through chromedriver (no skip when missing: `make test`
    installs chromium and chromium-driver)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1400,1400",
    ):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _claim_for_this_worker(tmp_path_factory, what: str) -> None:
    """Under pytest-xdist, fail if another worker of this session already made ``what``: its
    tests are grouped onto one worker (``xdist_group``), and a grouping that silently stopped
    working (pytest-xdist issue 1386) would pay for it twice."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return
    marker = tmp_path_factory.getbasetemp().parent / f"{what}.worker"  # shared by the workers
    try:
        with open(marker, "x") as f:
            f.write(worker)
    except FileExistsError:
        pytest.fail(
            f"{what} made on {marker.read_text()} and again on {worker}: "
            "the xdist_group of tests/conftest.py did not hold"
        )


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """The smoke pipeline (3 datasets) once per session: its workspace and the finished process.

    ``KDRAY_TEST_SMOKE_WS=<dir>`` (developers, not CI) runs it there once and reuses it after.
    """
    _claim_for_this_worker(tmp_path_factory, "smoke-run")
    reuse = os.environ.get("KDRAY_TEST_SMOKE_WS")
    ws = Path(reuse) if reuse else tmp_path_factory.mktemp("smoke") / "ws"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tune" / "run.py"),
            "--config",
            str(REPO / "configs" / "smoke.yaml"),
            "--workspace",
            str(ws),
            # Its own Ray temp dir: other tests' pipelines may run beside it (pytest-xdist).
            "--set",
            f"ray.temp_dir=/tmp/kdray-smoke-{os.getpid()}",
            *(["--resume"] if reuse else []),
        ],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return ws, proc


def crash_once(marker: Path, after: int = 2):
    """An audit actor class (kdray.audit) that kills its whole process once, on the batch after
    ``after`` batches were scored and handed back (their rows already on their way to the driver,
    so a retry that redid them would double rows); ``marker`` records that it happened and how
    many batches came back before. Restarted by Ray, it scores normally. For one actor."""
    from kdray.audit.scorer import AuditScorer

    count = marker.with_name(f"{marker.name}.batches")

    class CrashOnce(AuditScorer):
        def __call__(self, batch):
            done = int(count.read_text()) if count.exists() else 0
            if done >= after and not marker.exists():
                marker.write_text(str(done))
                os._exit(1)
            out = super().__call__(batch)
            count.write_text(str(done + 1))
            return out

    return CrashOnce


@pytest.fixture(scope="session")
def smoke_audit(smoke_run, ray_local, tmp_path_factory):
    """One dataset audit (tune/audit.py's pipeline) of the smoke run's eye_disease test split,
    logged to its MLflow, while its actor dies after two batches came back; for the audit's tests
    and the viewer's. Returns (AuditResult, the marker file the dying actor wrote)."""
    from kdray.audit.run import AuditRequest, run_audit
    from kdray.config import load_config
    from kdray.workspace import Workspace

    ws, _ = smoke_run
    tmp = tmp_path_factory.mktemp("audit")
    marker = tmp / "crashed"
    result = run_audit(
        load_config(REPO / "configs" / "smoke.yaml", []),
        Workspace.at(ws),
        # One actor: the other xdist worker keeps a core (two actors are the benchmark's and the
        # cluster test's); the actor it restarts after the crash takes the rest of the batches.
        AuditRequest("eye_disease", actors=1, batch_size=2, out=str(tmp / "out")),
        scorer_cls=crash_once(marker),
    )
    return result, marker


@dataclass
class Server:
    url: str
    token: str
    workspace: Path
    log: Path
    ray_tmpdir: Path | None = None  # the service's own Ray temp dir: names its processes

    def replica_pids(self, deployment: str) -> list[int]:
        """The service's replica processes of ``deployment`` (``ray::ServeReplica:kdray:<name>``),
        told from other Rays' by the RAY_TMPDIR they inherited from this service's start."""
        marker = f"RAY_TMPDIR={self.ray_tmpdir}".encode()
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes()
                if f"ServeReplica:kdray:{deployment}".encode() not in cmdline:
                    continue
                if marker in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:  # gone, or not ours to read
                continue
        return pids

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture(scope="module")
def served(smoke_run, tmp_path_factory):
    """`serve run serve/config.yaml` on the smoke run's registry: the user's path, on a free port,
    its own Ray (``--address local``, own temp dir), a bearer token, small SHAP sample counts.

    For one module (``test_serve.py`` holds every test of the running service): stopped after
    its last test, not at the session's end (an idle service takes about 0.15 of a core)."""
    from kdray.serving.launch import launch, service_config

    ws, _ = smoke_run
    config = service_config(
        REPO / "serve" / "config.yaml",
        free_port(),
        args={
            "tracking_uri": f"sqlite:///{ws / 'mlflow.db'}",
            "shap_nsamples": 8,
            "max_shap_nsamples": 16,
            "token_env": "KDRAY_TEST_SERVE_TOKEN",
            # Two 4096 x 4096 images decoding at once: the memory test's bound stays far below
            # what 16 unbounded decodes take.
            "max_decode_pixels": 2 * 4096 * 4096,
        },
    )
    service = launch(
        config,
        tmp_path_factory.mktemp("serve"),
        cwd=REPO,
        env={"KDRAY_TEST_SERVE_TOKEN": SERVE_TOKEN},
    )
    try:
        service.wait_ready()
        yield Server(service.url, SERVE_TOKEN, ws, service.log, service.ray_tmpdir)
    finally:
        service.stop()
    assert not service.ray_tmpdir.exists()  # stop() leaves no Ray session behind in /tmp


class Proxy:
    """A TCP proxy in front of a server, for outages of an exact length.

    Forwards 127.0.0.1:<port> to the server; ``down()`` refuses and cuts, ``up()`` reopens."""

    def __init__(self, target_port: int):
        self.target_port, self.port = target_port, free_port()
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.up()

    def up(self) -> None:
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(64)
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def down(self) -> None:
        _close(self._listener)  # shutdown() wakes the blocked accept(); close() alone would not
        with self._lock:
            for conn in self._conns:
                _close(conn)
            self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        _close(dst)


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


def huge_png_header(width: int, height: int) -> bytes:
    """A tiny, valid-looking PNG declaring width x height (tests of the size limits)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )

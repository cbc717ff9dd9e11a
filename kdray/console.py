"""A calm console: kdray's progress lines on the terminal, Ray's, Tune's and MLflow's chatter in a log file.

``tune/run.py`` runs inside :func:`calm_console`. The process's file descriptors 1 and 2 point at
``<workspace>/logs/run-<time>.log`` for the duration, so everything written to them lands there:
Python's ``print`` and logging, Ray's worker-log forwarding (``(RayTrainWorker pid=…)``), Tune's
status tables, Optuna, tqdm bars, warnings, and the C++ lines of Ray's core worker. The ``kdray``
logger also writes to the real terminal (a duplicate of the original stdout), so the terminal
shows what kdray reports: dataset, stage, teacher epochs, trials done, ETAs, the summary.
``-v`` (``verbose``) skips the redirection: everything on the terminal, as Ray prints it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["MetricWatcher", "calm_console", "eta", "log_path_for"]

FORMAT = "%(asctime)s kdray %(message)s"
DATEFMT = "%H:%M:%S"


def log_path_for(logs_dir: Path) -> Path:
    """A new log file name under ``logs_dir``: ``run-YYYYmmdd-HHMMSS.log`` (made unique)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = logs_dir / f"run-{stamp}.log", 1
    while path.exists():
        n += 1
        path = logs_dir / f"run-{stamp}-{n}.log"
    return path


@contextlib.contextmanager
def calm_console(log_path: Path | None, verbose: bool = False) -> Iterator[IO[str] | None]:
    """Send fds 1 and 2 to ``log_path`` while the block runs; the ``kdray`` logger also writes to
    the terminal. Yields the terminal stream (None when ``verbose``: nothing is redirected).

    On an exception its traceback goes to the log file, and the file descriptors are restored
    before it propagates (the caller tells the user, on the terminal).
    """
    if verbose or log_path is None:
        yield None
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    # kdray's lines go where its logging always went, stderr; stdout keeps the summary.
    terminal = os.fdopen(os.dup(saved_err), "w", buffering=1, encoding="utf-8", errors="replace")
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    handler = logging.StreamHandler(terminal)
    handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
    kdray_log = logging.getLogger("kdray")
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        kdray_log.addHandler(handler)
        if kdray_log.getEffectiveLevel() > logging.INFO:
            kdray_log.setLevel(logging.INFO)
        terminal.write(
            f"kdray: the full log (Ray, Tune, MLflow) is {log_path}; -v prints it here\n"
        )
        yield terminal
    except BaseException as exc:
        if not isinstance(exc, KeyboardInterrupt | SystemExit):
            sys.stderr.write("".join(traceback.format_exception(exc)))  # into the log file
        raise
    finally:
        _restore(saved_out, saved_err, log_fd, kdray_log, handler)
        terminal.close()


def _restore(
    saved_out: int, saved_err: int, log_fd: int, kdray_log: logging.Logger, handler: logging.Handler
) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    kdray_log.removeHandler(handler)
    os.dup2(saved_out, 1)
    os.dup2(saved_err, 2)
    for fd in (saved_out, saved_err, log_fd):
        os.close(fd)


def eta(elapsed: float, done: float, total: float) -> str:
    """`` · ETA 2 min 10 s`` from the pace so far; empty before the first step or after the last."""
    if done <= 0 or done >= total:
        return ""
    seconds = elapsed / done * (total - done)
    minutes, secs = divmod(round(seconds), 60)
    return f" · ETA {minutes} min {secs:02d} s" if minutes else f" · ETA {secs} s"


class MetricWatcher:
    """Polls an MLflow run's metric history in a thread and calls ``on_point(step, value)`` once
    per new step, in order. Used for the teacher's epochs: rank 0 logs them to MLflow, wherever it
    runs, and the driver reads them back (no channel into Ray Train's workers needed)."""

    def __init__(
        self,
        client: Any,
        run_id: str,
        key: str,
        on_point: Callable[[int, float], None],
        interval: float = 2.0,
    ) -> None:
        self.client, self.run_id, self.key = client, run_id, key
        self.on_point, self.interval = on_point, interval
        self._seen: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"kdray-watch-{key}", daemon=True)

    def __enter__(self) -> MetricWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.poll()  # the last epochs, logged between the final poll and the end of fit()

    def poll(self) -> None:
        try:
            history = self.client.get_metric_history(self.run_id, self.key)
        except Exception:  # noqa: BLE001 - progress is best effort; the run's own errors surface elsewhere
            return
        for point in sorted(history, key=lambda m: m.step):
            if point.step not in self._seen:
                self._seen.add(point.step)
                self.on_point(point.step, point.value)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

"""The calm console: what reaches the terminal, what goes to the log file, progress lines, ETA."""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from kdray.console import MetricWatcher, eta, log_path_for
from kdray.sweep import SweepProgress

REPO = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent("""
    import logging, os, subprocess, sys, warnings
    from pathlib import Path
    from kdray.console import calm_console
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    print("before", flush=True)
    with calm_console(Path(sys.argv[1]), verbose=sys.argv[2] == "1"):
        print("python print")
        os.write(2, b"raw fd 2 write\\n")
        subprocess.run(["echo", "child process output"], check=True)
        logging.getLogger("ray.tune").info("tune chatter")
        warnings.warn("a library warning")
        logging.getLogger("kdray").info("progress line")
        if sys.argv[3] == "fail":
            raise ValueError("boom")
    print("after", flush=True)
""")


def _run(
    tmp_path: Path, verbose: bool, fail: bool = False
) -> tuple[subprocess.CompletedProcess, Path]:
    log = tmp_path / "logs" / "run.log"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(log), "1" if verbose else "0", "fail" if fail else "ok"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    return proc, log


CHATTER = [
    "python print",
    "raw fd 2 write",
    "child process output",
    "tune chatter",
    "a library warning",
]


def test_the_terminal_gets_kdray_lines_and_the_log_file_everything(tmp_path):
    proc, log = _run(tmp_path, verbose=False)
    assert proc.returncode == 0, proc.stderr
    terminal = proc.stdout + proc.stderr
    for text in CHATTER:
        assert text not in terminal
        assert text in log.read_text()
    assert "progress line" in proc.stderr and "progress line" in log.read_text()
    assert f"the full log (Ray, Tune, MLflow) is {log}" in proc.stderr
    # Before and after the block the process writes where it always did.
    assert proc.stdout.splitlines()[0] == "before" and proc.stdout.splitlines()[-1] == "after"


def test_verbose_redirects_nothing(tmp_path):
    proc, log = _run(tmp_path, verbose=True)
    assert proc.returncode == 0, proc.stderr
    for text in CHATTER:
        assert text in proc.stdout + proc.stderr
    assert not log.exists()


def test_a_failure_restores_the_terminal_and_keeps_the_traceback_in_the_log(tmp_path):
    proc, log = _run(tmp_path, verbose=False, fail=True)
    assert proc.returncode == 1
    assert "ValueError: boom" in log.read_text()
    assert "ValueError: boom" in proc.stderr  # the interpreter's own report reached the terminal
    assert "python print" not in proc.stdout + proc.stderr


def test_eta_from_the_pace_so_far():
    assert eta(30.0, 1, 4) == " · ETA 1 min 30 s"
    assert eta(10.0, 2, 3) == " · ETA 5 s"
    assert eta(10.0, 0, 3) == ""  # no pace yet
    assert eta(10.0, 3, 3) == ""  # nothing left


def test_log_files_never_overwrite_each_other(tmp_path):
    first = log_path_for(tmp_path)
    first.write_text("x")
    assert log_path_for(tmp_path) != first


@dataclass
class _Point:
    step: int
    value: float


class _History:
    """An MLflow client's get_metric_history over a list that grows, as a training run's does."""

    def __init__(self) -> None:
        self.points: list[_Point] = []

    def get_metric_history(self, run_id: str, key: str) -> list[_Point]:
        assert (run_id, key) == ("run", "val_accuracy")
        return list(reversed(self.points))  # order must not matter


def test_the_metric_watcher_reports_each_new_step_once_in_order():
    client, seen = _History(), []
    watcher = MetricWatcher(
        client, "run", "val_accuracy", lambda s, v: seen.append((s, v)), interval=60
    )
    client.points += [_Point(0, 0.5), _Point(1, 0.6)]
    watcher.poll()
    watcher.poll()
    client.points.append(_Point(2, 0.7))
    with watcher:  # the final poll on exit picks up what the thread had no time to see
        pass
    assert seen == [(0, 0.5), (1, 0.6), (2, 0.7)]


@dataclass
class _Trial:
    trial_id: str
    last_result: dict


def test_sweep_progress_counts_trials_stopped_early_and_the_best_so_far(caplog):
    progress = SweepProgress("eye_disease", "KD sweep", total=4, epochs=12)
    full = _Trial("a", {"epoch": 11, "best_val_accuracy": 0.8})
    stopped = _Trial("b", {"epoch": 2, "best_val_accuracy": 0.6})
    running = _Trial("c", {"epoch": 5, "best_val_accuracy": 0.85})
    with caplog.at_level(logging.INFO, logger="kdray"):
        progress.on_trial_complete(0, [full, stopped, running], full)
        progress.on_trial_complete(0, [full, stopped, running], stopped)
    first, second = (r.getMessage() for r in caplog.records)
    assert first.startswith("eye_disease: KD sweep 1/4 trials done · best val acc 0.850")
    assert "ETA" in first
    assert second.startswith(
        "eye_disease: KD sweep 2/4 trials done, 1 stopped early · best val acc 0.850"
    )


@pytest.mark.parametrize("flag", ["-v", "--verbose"])
def test_run_help_documents_verbose(flag, capsys):
    from kdray.cli import build_parser

    assert build_parser().parse_args([flag]).verbose
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    assert "logs/run-*.log" in capsys.readouterr().out


def test_a_large_search_prints_about_eight_lines(caplog):
    progress = SweepProgress("alzheimer", "KD sweep", total=24, epochs=12)
    trials = [_Trial(str(i), {"epoch": 3, "best_val_accuracy": 0.5}) for i in range(24)]
    with caplog.at_level(logging.INFO, logger="kdray"):
        for trial in trials:
            progress.on_trial_complete(0, trials, trial)
    done = [int(r.getMessage().split("KD sweep ")[1].split("/")[0]) for r in caplog.records]
    assert done == [1, 3, 6, 9, 12, 15, 18, 21, 24]
    assert "24/24 trials done, 24 stopped early" in caplog.records[-1].getMessage()

"""Benchmarks that cannot rot: every script under benchmarks/ runs with ``--quick`` (the same code
as its full run, on tiny sizes) and prints its headline figures as finite numbers.

The figures of a quick run mean nothing: no test compares them with a goal. Each script runs in
a subprocess of its own, with an environment that joins no other Ray or MLflow (``clean_env``);
the scripts that start Ray give it a temp dir of their own.
"""

from __future__ import annotations

import ast
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, clean_env

BENCHMARKS = REPO / "benchmarks"
# A number as the scripts print it, nan and inf included (so that a non-finite one is caught by
# the test of finiteness, not reported as a missing line).
NUM = r"([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?nan|[-+]?inf)"

# script -> (headline patterns, ``{n}`` for each number; is an integration test). All are:
# even the plain PyTorch ones take 6 to 10 s each on 2 cores (imports, oneDNN's first kernels),
# too slow for `make test-fast`.
HEADLINES: dict[str, tuple[list[str], bool]] = {
    "audit_throughput.py": (
        [
            r"^audit Ray Data / plain loop, images/s: {n} \(steady state {n}\)$",
            r"^audit 2 actors / 1 actor: {n} \(steady state {n}\)$",
            r"^student only, \d actor\(s\): {n} images/s \({n} steady\)$",
            r"^SHAP \(\d+ samples\), student \+ teacher, \d actor\(s\): {n} images/s on \d+ sampled",
        ],
        True,
    ),
    "explain_speed.py": (
        [
            r"^(?:met |MISS)  full explanation teacher / student >= 15x: {n}x$",
            r"^(?:met |MISS)  student SHAP <= 1\.0 s: {n} s$",
            r"^(?:met |MISS)  student Grad-CAM \+ feature maps <= 30 ms: {n} ms$",
            r"^student SHAP: {n} s measured .*: {n}x the floor$",
        ],
        True,
    ),
    "kd_trial_cost.py": (
        [
            r"^ratio cached / CE-only: {n}  \(goal <= 1\.2\)$",
            r"^ratio live / cached: +{n}$",
        ],
        True,
    ),
    "student_runtimes.py": (
        [
            r"^conv 3x3 rate: 1 thread\(s\) {n} GFLOP/s, 2 thread\(s\) {n} GFLOP/s$",
            r"^(?:met |MISS)  best fp32 path at \d+ px, batch 1, 2 threads <= 1\.5x the "
            r"floor: {n}x \(.+\)$",
            r"^onnxruntime fp32 / torch eager at \d+ px, batch 1, 2 threads: {n}$",
        ],
        True,
    ),
    "teacher_precision.py": (
        [
            r"^bf16 / fp32 step time: {n}$",
            r"^fp32 val accuracy per epoch \(eye_disease\): {n}$",
            r"^bf16 val accuracy per epoch \(eye_disease\): {n}$",
        ],
        True,
    ),
    "teacher_recipe.py": (
        [
            r"^  CE student +{n}$",
            r"^  teacher current +{n}$",
            r"^  teacher no_zoom +{n}$",
        ],
        True,
    ),
    "train_overhead.py": (
        [
            r"^Ray Train / plain, whole epoch: {n}$",
            r"^Ray Train fixed start-up: {n} s$",
        ],
        True,
    ),
    "sweep_throughput.py": (
        [
            r"^Tune KD trial / plain loop, same epochs: {n}$",
            r"^KD trials per minute, 2 cores: {n}$",
            r"^  ASHA grace 4, reduction 3: stops {n}/{n} trials",
            r"^transparency scoring / none, same trials: {n} \(sweeps {n} s against {n} s; "
            r"one scoring {n} s median",
        ],
        True,
    ),
    "serve_bench.py": (
        [
            r"^Gateway predicts with: onnx \(",  # the benchmark's student has its ONNX copy
            r"^/predict 1 client: p50 {n} ms, p99 {n} ms",
            r"^Serve / plain, p50 at 1 client: {n}x",
            r"^CPU ceiling .*: {n} img/s; Serve with batching / ceiling: {n}x",
            r"^/explain all three, model=both: p50 {n} ms$",
            r"^predict p99 idle {n} ms, under 4 SHAP clients {n} ms: {n}x",
            r"^ingress haproxy \(make serve\): /predict p50 {n} ms \({n}x plain\), "
            r"16 clients {n} req/s \({n}x plain\); ready in {n} s, stopped in {n} s$",
        ],
        True,
    ),
}
# A quick run takes seconds to a minute (4 min seen on a loaded machine): this bounds a hung one.
TIMEOUT_S = 600


def run_quick(script: str, tmp_path: Path) -> tuple[str, float]:
    """``python benchmarks/<script> --quick`` in ``tmp_path``: its output and wall seconds.

    Fails with the output's tail when the script fails or hangs; a hung one gets Ctrl-C first
    (its ``finally`` blocks stop the services and Ray it started), then SIGKILL."""
    env = clean_env(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    log = tmp_path / "output.log"
    started = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, str(BENCHMARKS / script), "--quick"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            pytest.fail(f"{script} --quick ran over {TIMEOUT_S} s:\n{log.read_text()[-5000:]}")
    seconds = time.monotonic() - started
    output = log.read_text()
    assert rc == 0, f"{script} --quick exited {rc}:\n{output[-5000:]}"
    return output, seconds


def headline_numbers(output: str, patterns: list[str]) -> list[float]:
    """The numbers of every headline pattern, each matched on one line of ``output``."""
    numbers = []
    for pattern in patterns:
        regex = re.compile(pattern.replace("{n}", NUM), re.MULTILINE)
        match = regex.search(output)
        assert match, f"no line matches {pattern!r} in:\n{output[-5000:]}"
        numbers += [float(g) for g in match.groups()]
    return numbers


# Scripts whose scenario a test runs in-process (and checks the printed lines of): no --quick here.
SCENARIO_TESTS = {"serve_ops.py": "test_serve_ops.py"}


def test_every_benchmark_is_covered_and_documents_quick():
    scripts = sorted(p.name for p in BENCHMARKS.glob("*.py"))
    assert scripts == sorted([*HEADLINES, *SCENARIO_TESTS])
    for name, test in SCENARIO_TESTS.items():
        assert f"benchmarks/{name}" in (REPO / "tests" / test).read_text()
    for name in HEADLINES:
        doc = ast.get_docstring(ast.parse((BENCHMARKS / name).read_text())) or ""
        assert "--quick" in doc, f"{name}: the docstring does not mention --quick"


def _is_submodule(package: str, name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(f"{package}.{name}") is not None
    except ModuleNotFoundError:  # ``package`` is a module, not a package
        return False


def test_every_kdray_name_a_benchmark_imports_exists():
    """The rot a refactor brings, caught in `make test` (the quick runs are `make bench-check`):
    each ``from kdray... import name`` and ``import kdray...`` of every script, at any depth,
    resolves against the code as it is."""
    import importlib

    checked = 0
    for path in sorted(BENCHMARKS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "kdray":
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name) or _is_submodule(node.module, alias.name), (
                        f"{path.name}: {node.module} has no {alias.name}"
                    )
                    checked += 1
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "kdray":
                        importlib.import_module(alias.name)
                        checked += 1
    assert checked > 20  # the scripts do import kdray: the walk found them


def test_headline_parser_catches_non_finite_numbers():
    patterns = [r"^ratio live / cached: +{n}$"]
    assert headline_numbers("ratio live / cached:    1.25\n", patterns) == [1.25]
    assert not math.isfinite(headline_numbers("ratio live / cached: nan\n", patterns)[0])
    assert not math.isfinite(headline_numbers("ratio live / cached: inf\n", patterns)[0])


@pytest.mark.parametrize(
    "script",
    [
        pytest.param(
            name,
            id=name.removesuffix(".py"),
            marks=[pytest.mark.benchmark, *([pytest.mark.integration] if integration else [])],
        )
        for name, (_, integration) in HEADLINES.items()
    ],
)
def test_quick_run_prints_finite_headlines(script: str, tmp_path: Path):
    patterns, _ = HEADLINES[script]
    output, seconds = run_quick(script, tmp_path)
    numbers = headline_numbers(output, patterns)
    assert all(math.isfinite(x) for x in numbers), f"non-finite headline figure:\n{output}"
    print(f"{script} --quick: {seconds:.1f} s")
    # Its temp files go to temp dirs of its own: nothing lands where it runs but the test's log.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["output.log"]

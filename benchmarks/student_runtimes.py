"""The student's forward pass on each runtime, against the FLOPs floor of this machine.

Side by side in one run, at 64 and 224 px, batch 1 and 16, one and two threads: torch eager
(channels-last weights, inference mode: how the Serve Gateway predicts with ``runtime: torch``),
``torch.compile`` (inductor; if it compiles here), onnxruntime fp32 on kdray's exported
``predict.onnx`` (the Gateway's ``runtime: onnx``), and onnxruntime int8 on its statically
quantised copy. Each figure is milliseconds per image (median of ``--repeats`` rounds in which
the runtimes take turns) and that time / the floor, where the floor is the student's FLOPs
(``torch.utils.flop_counter``) / the GFLOP/s of a plain 3x3 convolution measured in the same run
at the same threads (the best of its rounds: what the cores can do).

Held equal between the runtimes: the weights, the batch of uint8 (3, S, S) images as the
Gateway's predict workers get them, and what each call computes from them to the probabilities
as a list: the Gateway's own predict functions (``kdray.serving.deployments.probabilities`` for
torch, :class:`kdray.edge.runtime.OnnxPredictor` for onnxruntime), so uint8 -> float, / 255 and
the softmax are inside every timed call; the intra-op threads (torch's, onnxruntime's; one
inter-op thread); one untimed call before each figure; the same time per figure; the rounds.
The explain comparison holds equal the image, the threads, the Grad-CAM layer (the export's) and
the model in contiguous memory format on the torch side (as the Serve Explainer loads it).

The student is the default run's brain_tumor champion shape (widths 16-32-64-128-128, 0.45 GFLOP
at 224 px) with random weights: speed does not depend on the values. Also printed: the explain
graph (``model.onnx``: feature maps and Grad-CAM too) against kdray's torch explainers at the same
point, and which runtime wins at each point.

``python benchmarks/student_runtimes.py`` (about 90 s on 2 cores) or ``--quick`` (the same code,
64 px only, batch 1, few rounds, no ``torch.compile``: seconds) to check that it runs; quick
figures mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from kdray.edge.export import EXPLAIN_FILE, PREDICT_FILE, export_student, session
from kdray.edge.quantize import INT8_FILE, quantize_predict
from kdray.edge.runtime import OnnxPredictor
from kdray.explain import feature_maps, grad_cam
from kdray.models import ModelSpec, StudentCNN, count_flops
from kdray.serving.deployments import probabilities

WIDTHS = [16, 32, 64, 128, 128]
GOAL_FLOOR_RATIO = 1.5  # the best fp32 path at 224 px, batch 1


def conv_gflops(threads: int, rounds: int) -> float:
    """Best GFLOP/s of a 3x3, 64->64 convolution on 8 x 56 x 56 inputs at ``threads``."""
    torch.set_num_threads(threads)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False).eval()
    x = torch.rand(8, 64, 56, 56)
    flops = 2 * 8 * 64 * 64 * 9 * 56 * 56
    best = 0.0
    with torch.inference_mode():
        conv(x)
        for _ in range(rounds):
            t0 = time.perf_counter()
            conv(x)
            best = max(best, flops / (time.perf_counter() - t0) / 1e9)
    return best


def ms_per_image(fn: Callable[[], object], n: int, min_seconds: float) -> float:
    """Milliseconds per image of ``fn`` (a batch of ``n``), over at least ``min_seconds``."""
    fn()
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            return elapsed / calls / n * 1000


def runtimes(
    model: StudentCNN, folder: Path, x: np.ndarray, threads: int, use_compile: bool
) -> dict[str, Callable[[], object]]:
    torch.set_num_threads(threads)
    # The Gateway's store keeps channels-last weights (a copy: ``model`` stays as loaded).
    eager = copy.deepcopy(model).to(memory_format=torch.channels_last)
    images = list(x)  # what a predict worker gets: the batch's decoded uint8 (3, S, S) images

    def torch_eager() -> object:
        with torch.inference_mode():
            return probabilities(eager, images, torch.device("cpu"))

    fns: dict[str, Callable[[], object]] = {"torch eager": torch_eager}
    if use_compile:
        compiled = torch.compile(eager, dynamic=False)

        def torch_compiled() -> object:
            with torch.inference_mode():
                return probabilities(compiled, images, torch.device("cpu"))

        try:
            torch_compiled()
            fns["torch.compile"] = torch_compiled
        except Exception as exc:  # no C++ toolchain, an unsupported op: say so, go on
            print(f"  torch.compile unavailable: {type(exc).__name__}: {str(exc)[:120]}")
    for name, file in (("onnxruntime fp32", PREDICT_FILE), ("onnxruntime int8", INT8_FILE)):
        predictor = OnnxPredictor(session(folder / file, threads), "")
        fns[name] = lambda predictor=predictor: predictor.probabilities(images)
    return fns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 px, batch 1, short rounds")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (median reported)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    args = parser.parse_args()
    if args.quick and not args.no_compile:  # compiling takes longer than the rest of --quick
        print("torch.compile: not run with --quick (inductor compiles for tens of seconds)")
        args.no_compile = True
    sizes, batches = ([64], [1]) if args.quick else ([64, 224], [1, 16])
    repeats, min_s = (1, 0.05) if args.quick else (args.repeats, 0.4)
    threads_list = [1, 2]
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    rates = {t: conv_gflops(t, 5 if args.quick else 20) for t in threads_list}
    print("conv 3x3 rate: " + ", ".join(f"{t} thread(s) {r:.1f} GFLOP/s" for t, r in rates.items()))
    headline: tuple[int, dict[str, float], dict[str, float]] = (0, {}, {})
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            model = StudentCNN(4, WIDTHS).eval()
            spec = ModelSpec("student", 4, size, list("abcd"), widths=WIDTHS, dataset="bench")
            folder = Path(tmp) / str(size)
            images = rng.integers(0, 256, (64, 3, size, size), dtype=np.uint8)
            cam_layer = export_student(model, spec, folder, images[:8]).card["cam_layer"]
            quantize_predict(folder, images, images[:16], np.zeros(16, dtype=np.int64))
            flops = count_flops(model, size)
            print(f"\n{size} px: {flops / 1e9:.3f} GFLOP an image")
            for batch in batches:
                for threads in threads_list:
                    floor_ms = flops / (rates[threads] * 1e9) * 1000
                    x = images[:batch]
                    fns = runtimes(model, folder, x, threads, not args.no_compile)
                    times: dict[str, list[float]] = {k: [] for k in fns}
                    for _ in range(repeats):  # the runtimes take turns each round
                        for name, fn in fns.items():
                            times[name].append(ms_per_image(fn, batch, min_s))
                    med = {k: statistics.median(v) for k, v in times.items()}
                    cells = "  ".join(
                        f"{k} {v:.3f} ms ({v / floor_ms:.2f}x)" for k, v in med.items()
                    )
                    win = min(med, key=med.get)
                    print(f"  batch {batch:>2}, {threads} thread(s): {cells}  -> {win}")
                    if batch == 1 and threads == 2:  # the headline point: the largest size
                        headline = (size, {k: v / floor_ms for k, v in med.items()}, med)
            # The explain graph against kdray's torch explainers, batch 1, 2 threads.
            torch.set_num_threads(2)
            x1 = images[:1]
            sess = session(folder / EXPLAIN_FILE, 2)
            ex = {
                "torch feature maps + Grad-CAM": lambda x1=x1, model=model, layer=cam_layer: (
                    feature_maps(model, x1),
                    grad_cam(model, x1, layer),
                ),
                "onnx explain graph": lambda x1=x1, sess=sess: sess.run(None, {"image": x1}),
            }
            ex_times = {k: [] for k in ex}
            for _ in range(repeats):
                for name, fn in ex.items():
                    ex_times[name].append(ms_per_image(fn, 1, min_s))
            cells = "  ".join(f"{k} {statistics.median(v):.2f} ms" for k, v in ex_times.items())
            print(f"  explain, batch 1, 2 threads: {cells}")
    size, ratios, med = headline
    fp32 = {k: v for k, v in ratios.items() if k != "onnxruntime int8"}
    best = min(fp32, key=fp32.get)
    verdict = "met " if fp32[best] <= GOAL_FLOOR_RATIO else "MISS"
    print(
        f"\n{verdict}  best fp32 path at {size} px, batch 1, 2 threads <= {GOAL_FLOOR_RATIO}x "
        f"the floor: {fp32[best]:.2f}x ({best})"
    )
    print(
        f"onnxruntime fp32 / torch eager at {size} px, batch 1, 2 threads: "
        f"{med['onnxruntime fp32'] / med['torch eager']:.2f}"
    )
    if args.quick:
        print("quick run (64 px, short rounds): the figures mean nothing")


if __name__ == "__main__":
    main()

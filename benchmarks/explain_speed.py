"""How fast are explanations? DenseNet121 teacher vs a 5-block student, side by side.

Measures, at 224x224 on a few CPU threads (default 2), per image and as medians over
``--repeats`` rounds in which teacher and student take turns:

* feature maps, Grad-CAM and SHAP (expected gradients, ``--nsamples`` samples, ``--background``
  background images) for each model, and the full ``explain()`` call with all three;
* the student's SHAP time against its compute floor: ``nsamples`` x the FLOPs of one forward
  and input-gradient backward pass (counted by ``FlopCounterMode``) / a GFLOP/s rate measured
  here on a plain 3x3 convolution;
* the student's Grad-CAM + feature maps together;
* optionally ``shap.GradientExplainer`` as shipped (every class, default batching) for reference.

Held equal between teacher and student: the calls (kdray's own explainers, at each model's
default layers, as the Serve Explainer runs them), the image of each round and the SHAP
background, the input size, both models in eval mode and contiguous memory format (as the
Explainer's model store loads them), the torch threads (``--threads``; the Explainer replica
runs 1), one untimed warm-up pass of every call, the number of rounds, and the order (teacher
first one round, student first the next). Only the model differs.

Run ``python benchmarks/explain_speed.py`` (several minutes: the teacher's SHAP is slow) or
``--quick`` (the same code at 64x64, one round, 8 SHAP samples on 4 background images: seconds)
to check that it works; its figures mean nothing. Other jobs on the machine make the numbers
noisy: read the medians, and the minimum as what the code can do.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from kdray.config import ExplainConfig
from kdray.explain import explain, feature_maps, grad_cam, shap_maps
from kdray.explain.cost import count_flops
from kdray.models import StudentCNN, TeacherDenseNet

GOAL_RATIO = 15.0
GOAL_STUDENT_SHAP_S = 1.0
GOAL_STUDENT_CAM_FM_MS = 30.0
# --quick: the same code on tiny sizes (seconds), to check that the script works.
QUICK = {"size": 64, "repeats": 1, "nsamples": 8, "background": 4}


def conv_gflops(repeats: int = 10) -> tuple[float, float]:
    """Median and best GFLOP/s of a 3x3, 64->64 convolution on 8 x 56 x 56 inputs."""
    conv = torch.nn.Conv2d(64, 64, 3, padding=1, bias=False).eval()
    x = torch.rand(8, 64, 56, 56)
    flops = 2 * 8 * 64 * 64 * 9 * 56 * 56
    rates = []
    with torch.no_grad():
        conv(x)
        for _ in range(repeats):
            t0 = time.perf_counter()
            conv(x)
            rates.append(flops / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates), max(rates)


def seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def library_shap(model: torch.nn.Module, x: torch.Tensor, bg: torch.Tensor, nsamples: int) -> None:
    """``shap.GradientExplainer`` with its defaults: every class, batches of 50."""
    import shap

    shap.GradientExplainer(model, bg).shap_values(x, nsamples=nsamples, rseed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224, help="input side")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--nsamples", type=int, default=50, help="SHAP samples per image")
    parser.add_argument("--background", type=int, default=16, help="SHAP background images")
    parser.add_argument(
        "--library-baseline",
        action="store_true",
        help="also time shap.GradientExplainer as shipped (teacher: ~1 min)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="64x64, 1 round, 8 SHAP samples, 4 background"
    )
    args = parser.parse_args()
    if args.quick:  # smaller defaults; options given explicitly still win
        parser.set_defaults(**QUICK)
        args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size = args.size
    models = {
        "teacher": TeacherDenseNet(4).eval(),
        "student": StudentCNN(4, [16, 32, 64, 128, 128]).eval(),
    }
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(args.repeats + 1, 3, size, size, generator=gen)
    bg = torch.rand(args.background, 3, size, size, generator=gen)
    nsamples = args.nsamples

    cfg = ExplainConfig(shap_nsamples=nsamples, shap_background=args.background)

    def calls(model: torch.nn.Module, x: torch.Tensor) -> dict[str, Callable[[], object]]:
        return {
            "feature maps": lambda: feature_maps(model, x),
            "Grad-CAM": lambda: grad_cam(model, x),
            f"SHAP ({nsamples} samples)": lambda: shap_maps(model, x, bg, nsamples=nsamples),
            "Grad-CAM + feature maps": lambda: (feature_maps(model, x), grad_cam(model, x)),
            "  the same via explain(), PNGs": lambda: explain(
                model, x[0], methods=["feature_maps", "gradcam"], cfg=cfg
            ),
            "full explain(): all 3 + PNGs": lambda: explain(model, x[0], background=bg, cfg=cfg),
        }

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {size}x{size}, "
        f"SHAP {nsamples} samples / {args.background} background, {args.repeats} round(s)"
    )
    # Warm-up: the first call of every shape builds oneDNN kernels (seconds for DenseNet).
    for name, model in models.items():
        t = seconds(lambda model=model: [fn() for fn in calls(model, images[-1:]).values()])
        print(f"warm-up {name}: {t:.1f} s")
    times: dict[tuple[str, str], list[float]] = {}
    rates = []
    for r in range(args.repeats):
        rates.append(conv_gflops()[0])
        x = images[r : r + 1]
        # Teacher and student take turns; who goes first alternates round by round.
        for name in list(models) if r % 2 == 0 else list(reversed(models)):
            for method, fn in calls(models[name], x).items():
                times.setdefault((name, method), []).append(seconds(fn))
        print(f"round {r + 1}/{args.repeats} done", flush=True)
    if args.library_baseline:
        for name, model in models.items():
            fn = lambda model=model: library_shap(model, images[:1], bg, nsamples)  # noqa: E731
            times[(name, "shap library, all classes")] = [seconds(fn)]

    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    methods = list(dict.fromkeys(m for _, m in times))
    print()
    print(
        f"| {'per image, ' + str(size) + 'x' + str(size):32s} | {'teacher ms':>20s} | "
        f"{'student ms':>18s} | {'teacher / student':>17s} |"
    )
    print(f"|{'-' * 34}|{'-' * 22}:|{'-' * 20}:|{'-' * 19}:|")
    for method in methods:
        t, s = med[("teacher", method)], med[("student", method)]
        cell_t = f"{1e3 * t:9.1f} (min {1e3 * best[('teacher', method)]:7.1f})"
        cell_s = f"{1e3 * s:7.1f} (min {1e3 * best[('student', method)]:7.1f})"
        print(f"| {method:32s} | {cell_t:>20s} | {cell_s:>18s} | {t / s:16.1f}x |")

    rate_med = statistics.median(rates)
    student = models["student"]
    fb_flops = count_flops(student, size, backward=True)
    floor = nsamples * fb_flops / (rate_med * 1e9)
    shap_key = ("student", f"SHAP ({nsamples} samples)")
    full = "full explain(): all 3 + PNGs"
    ratio = med[("teacher", full)] / med[("student", full)]
    cam_fm = med[("student", "Grad-CAM + feature maps")] * 1e3
    print()
    print(f"conv rate (3x3, 64->64, 8x56x56): median {rate_med:.1f} GFLOP/s over the rounds")
    print(
        f"student forward {count_flops(student, size) / 1e9:.3f} GFLOP, forward + input "
        f"backward {fb_flops / 1e9:.3f} GFLOP; teacher forward "
        f"{count_flops(models['teacher'], size) / 1e9:.3f} GFLOP"
    )
    print(
        f"student SHAP: {med[shap_key]:.3f} s measured (min {best[shap_key]:.3f} s), compute "
        f"floor {floor:.3f} s ({nsamples} x {fb_flops / 1e9:.3f} GFLOP / {rate_med:.1f} "
        f"GFLOP/s): {med[shap_key] / floor:.2f}x the floor"
    )
    print()
    goals = [
        (
            f"full explanation teacher / student >= {GOAL_RATIO:.0f}x",
            f"{ratio:.1f}x",
            ratio >= GOAL_RATIO,
        ),
        (
            f"student SHAP <= {GOAL_STUDENT_SHAP_S:.1f} s",
            f"{med[shap_key]:.3f} s",
            med[shap_key] <= GOAL_STUDENT_SHAP_S,
        ),
        (
            f"student Grad-CAM + feature maps <= {GOAL_STUDENT_CAM_FM_MS:.0f} ms",
            f"{cam_fm:.1f} ms",
            cam_fm <= GOAL_STUDENT_CAM_FM_MS,
        ),
    ]
    for goal, got, ok in goals:
        print(f"{'met ' if ok else 'MISS'}  {goal}: {got}")
    if size != 224:
        print("(goals are stated for 224x224)")


if __name__ == "__main__":
    main()

"""The HTTP service under load, measured side by side in one run (issue 8's figures).

A 224x224 student and its DenseNet121 teacher (untrained: speed does not depend on the weights)
are registered in a temporary MLflow registry with kdray's own code; the service runs as users
run it (``serve run`` on ``serve/config.yaml`` with overrides, 1 replica each); clients are
asyncio (aiohttp) in this process and post a 512x512 PNG as the raw body. Printed:

- /predict p50 / p99 with 1 client (goal p50 <= 15 ms);
- throughput with 16 clients, batching on vs off, and against the CPU ceiling (the same decode +
  predict in one process, no HTTP);
- the same load against a plain FastAPI + uvicorn process serving the same model the same way:
  Serve's overhead at p50 (goal <= 1.3x);
- /explain p50: feature_maps+gradcam (goal <= 60 ms; also with render=layer and render=none),
  +shap (goal <= 1 s), model=both;
- the ingress modes side by side (kdray.serving.launch.INGRESS: make serve's HAProxy in front
  of the replica, Serve's proxy, plain direct ingress) and the Gateway predicting with torch
  instead of onnxruntime;
- predict p99 while 4 clients keep asking for SHAP, against idle p99 (goal <= 3x).

Held equal between Serve and the plain app (the ``Serve / plain`` ratios): the model files, the
request (the same PNG body, posted raw, by the same clients), the decode (kdray's ``read_image``
on a request thread pool), the predict runtime and its check at load (the Gateway's
``runtime: onnx``: :func:`kdray.edge.runtime.load_onnx_predictor` on the student's export, torch
where it does not match; torch weights channels-last), the forward passes at once and their
threads (as many predict workers as the Gateway replica has CPUs in ``serve/config.yaml``, one
intra-op thread each), the warm-up requests and the series' lengths, and when: the plain app
runs before the services and again after them, its figures pooled. Not held equal, on purpose:
what Serve adds (its ingress, the replica's process, ``@serve.batch``: at 16 clients the Gateway
predicts batches of up to 8, the plain app one image a call). The CPU ceiling is the same decode
and predict functions in one process, no HTTP, at the best of three layouts.

    .venv/bin/python benchmarks/serve_bench.py [--seconds 15] [--requests 300]

``--quick`` (1 s loads, 5 requests per latency series, 1 per /explain series, 1 warm-up request,
8 SHAP samples, no second service with batching off (``--batching-off`` adds it back), the plain
app before the services only) runs the same code to check that it works; its figures mean nothing. Each service runs on a private
Ray (``serve run --address local``, its own temp dir), never on another Ray of this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import numpy as np
import torch
import yaml
from PIL import Image

from kdray.config import MLflowConfig
from kdray.data import synthetic
from kdray.data.images import read_image
from kdray.edge.export import PREDICT_FILE, session
from kdray.edge.publish import export_registered
from kdray.edge.runtime import OnnxPredictor
from kdray.explain.background import save_background
from kdray.models import ModelSpec, build_model, save_model
from kdray.registry import log_model_folder, register_model, registered_name
from kdray.serving.deployments import probabilities
from kdray.serving.launch import DEFAULT_INGRESS, free_port, launch, service_config
from kdray.tracking import Tracker
from kdray.workspace import Workspace

REPO = Path(__file__).resolve().parent.parent
DATASET, SIZE = "brain_tumor", 224
# --quick: the same code with tiny loads, to check that the script works.
QUICK = {
    "seconds": 1.0,
    "requests": 5,
    "explain_requests": 1,
    "warmup": 1,
    "shap_nsamples": 8,
    "batching_off": False,  # a second `serve run` costs tens of seconds; its code is the same
    "torch_runtime": False,
    "ingress": "",
}


def register_models(ws: Workspace) -> tuple[str, Path]:
    """A 224-px student and teacher registered as kdray-brain_tumor(-teacher)@champion."""
    # The workspace's own SQLite registry, never $MLFLOW_TRACKING_URI's.
    tracker = Tracker.open(MLflowConfig(tracking_uri=f"sqlite:///{ws.mlflow_db.resolve()}"), ws)
    classes = ["glioma", "meningioma", "notumor", "pituitary"]
    background = np.random.default_rng(0).integers(0, 256, (16, 3, SIZE, SIZE), dtype=np.uint8)
    student_dir = ws.root / "student"
    for kind in ("student", "teacher"):
        spec = ModelSpec(
            kind=kind,
            num_classes=4,
            image_size=SIZE,
            class_names=classes,
            widths=[16, 32, 64, 128, 128] if kind == "student" else [],
            dataset=DATASET,
        )
        torch.manual_seed(0)
        model = build_model(spec)
        folder = save_model(model, spec, ws.root / kind)
        save_background(folder, background)
        run_id = tracker.start_run(f"bench-{kind}", DATASET, kind)
        log_model_folder(tracker.client, run_id, folder)
        tracker.log_metrics(run_id, {"params": sum(p.numel() for p in model.parameters())})
        register_model(
            tracker.client, registered_name(DATASET, teacher=kind == "teacher"), run_id, "champion"
        )
        if kind == "student":  # its ONNX copy, as tune/run.py makes one (runtime: onnx)
            export_registered(
                registered_name(DATASET),
                "champion",
                background,
                ws.root / "edge",
                tracker.tracking_uri,
            )
        tracker.end_run(run_id)
    return tracker.tracking_uri, student_dir


def test_png(size: int = 512) -> bytes:
    """A brain MRI slice of kdray's synthetic stand-in (tumour, noise and all) as a gray PNG."""
    images, _, _ = synthetic.make_arrays(DATASET, 1, size, seed=1)
    buf = io.BytesIO()
    Image.fromarray(images[0]).convert("L").save(buf, format="PNG")  # MRI: one channel
    return buf.getvalue()


async def _timed(session: aiohttp.ClientSession, url: str, body: bytes) -> float:
    started = time.perf_counter()
    async with session.post(url, data=body, headers={"Content-Type": "image/png"}) as response:
        await response.read()
        if response.status != 200:
            raise RuntimeError(f"{url}: {response.status} {await response.text()}")
    return (time.perf_counter() - started) * 1e3


async def latencies(url: str, body: bytes, n: int, warmup: int = 10) -> list[float]:
    async with aiohttp.ClientSession() as session:
        for _ in range(warmup):
            await _timed(session, url, body)
        return [await _timed(session, url, body) for _ in range(n)]


async def throughput(
    url: str, body: bytes, clients: int, seconds: float
) -> tuple[float, list[float]]:
    """Requests per second with ``clients`` closed-loop clients, and their latencies."""
    done: list[float] = []
    stop = time.perf_counter() + seconds

    async def client(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < stop:
            done.append(await _timed(session, url, body))

    connector = aiohttp.TCPConnector(limit=clients + 8)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(_timed(session, url, body) for _ in range(clients)))  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        return len(done) / (time.perf_counter() - started), done


async def predict_under_shap(
    predict_url: str, shap_url: str, body: bytes, n: int, settle: float = 2.0
) -> list[float]:
    """Predict latencies of one client while 4 clients keep asking for SHAP (after ``settle`` s)."""
    stop = asyncio.Event()

    async def shap_client(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            await _timed(session, shap_url, body)

    async with aiohttp.ClientSession() as session:
        load = [asyncio.create_task(shap_client(session)) for _ in range(4)]
        await asyncio.sleep(settle)  # let the SHAP load build up
        result = await latencies(predict_url, body, n, warmup=0)
        stop.set()
        await asyncio.gather(*load)
    return result


async def _models(url: str) -> list[dict]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return (await response.json())["models"]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def gateway_workers() -> int:
    """The Gateway replica's predict workers on a CPU: one per CPU serve/config.yaml gives it."""
    config = yaml.safe_load((REPO / "serve" / "config.yaml").read_text())
    gateway = next(d for d in config["applications"][0]["deployments"] if d["name"] == "Gateway")
    return max(1, int(gateway.get("ray_actor_options", {}).get("num_cpus", 1)))


def ceiling(student_dir: Path, edge_dir: Path, body: bytes, seconds: float) -> tuple[float, str]:
    """The best images/s of decode + resize + predict in this process, no HTTP, with the
    Gateway's own predict functions: the fastest of one torch loop at batch 8 on all threads,
    one torch loop per core at batch 1 on one thread each, and one onnxruntime loop per core at
    batch 1 on one thread each."""
    import threading

    from kdray.models import load_model

    model = load_model(student_dir)[0].to(memory_format=torch.channels_last)
    onnx = OnnxPredictor(session(edge_dir / PREDICT_FILE, threads=1), "")

    def torch_forward(images: list[np.ndarray]) -> None:
        with torch.inference_mode():
            probabilities(model, images, torch.device("cpu"))

    def onnx_forward(images: list[np.ndarray]) -> None:
        onnx.probabilities(images)

    def loop(
        forward: Callable[[list[np.ndarray]], None], batch: int, stop: float, counts: list[int]
    ) -> None:
        while time.perf_counter() < stop:
            forward([read_image(body, SIZE) for _ in range(batch)])
            counts.append(batch)

    results = {}
    for name, batch, loops, threads, fn in (
        ("1 torch loop, batch 8, 2 threads", 8, 1, 2, torch_forward),
        ("2 torch loops, batch 1, 1 thread each", 1, 2, 1, torch_forward),
        ("2 onnxruntime loops, batch 1, 1 thread each", 1, 2, 1, onnx_forward),
    ):
        torch.set_num_threads(threads)
        counts: list[int] = []
        stop = time.perf_counter() + seconds / 2
        workers = [
            threading.Thread(target=loop, args=(fn, batch, stop, counts)) for _ in range(loops)
        ]
        started = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        results[name] = sum(counts) / (time.perf_counter() - started)
    best = max(results, key=results.get)
    return results[best], best


PLAIN_APP = textwrap.dedent('''
    """The same model behind plain FastAPI + uvicorn in one process (the benchmark's reference),
    predicting as the Gateway replica does, one image a call: argv student dir, port, edge dir
    ('' for torch), predict workers."""
    import asyncio
    import json
    import sys
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path
    import torch
    from fastapi import FastAPI, Request
    from starlette.concurrency import run_in_threadpool
    from kdray.data.images import read_image
    from kdray.edge.export import CARD_FILE
    from kdray.edge.runtime import load_onnx_predictor
    from kdray.explain.background import load_background
    from kdray.models import load_model
    from kdray.serving.deployments import probabilities

    student_dir, port, edge_dir, workers = sys.argv[1:5]
    torch.set_num_threads(1)  # one torch thread per predict worker, as the Gateway replica
    model, spec = load_model(student_dir)
    model.requires_grad_(False)
    model = model.to(memory_format=torch.channels_last)  # as the Gateway's store keeps it
    predictor = None
    if edge_dir:  # runtime: onnx, with the Gateway's check against the torch weights
        export = (Path(edge_dir), json.loads((Path(edge_dir) / CARD_FILE).read_text()))
        predictor, note = load_onnx_predictor(export, model, 1, load_background(student_dir))
        print(f"plain app predicts with {note}", file=sys.stderr, flush=True)
    pool = ThreadPoolExecutor(max_workers=int(workers), thread_name_prefix="predict")
    app = FastAPI()

    @torch.inference_mode()
    def _predict(image) -> list[float]:
        if predictor is not None:
            return predictor.probabilities([image])[0]
        return probabilities(model, [image], torch.device("cpu"))[0]

    @app.post("/v1/models/brain_tumor/predict")
    async def predict(request: Request) -> dict:
        image = await run_in_threadpool(read_image, await request.body(), spec.image_size)
        probs = await asyncio.get_running_loop().run_in_executor(pool, _predict, image)
        return {"probabilities": probs}

    if __name__ == "__main__":
        import uvicorn
        uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning")
''')


def run_plain(
    student_dir: Path,
    edge_dir: Path | None,
    body: bytes,
    n: int,
    seconds: float,
    tmp: Path,
    warmup: int = 10,
) -> tuple[list[float], float, list[float]]:
    """The plain app measured: 1-client latencies, 16-client requests/s and latencies.
    ``edge_dir``: predict with its ONNX export (as the Gateway's ``runtime: onnx``), else torch."""
    script = tmp / "plain_app.py"
    script.write_text(PLAIN_APP)
    port = free_port()
    argv = [str(student_dir), str(port), str(edge_dir or ""), str(gateway_workers())]
    proc = subprocess.Popen([sys.executable, str(script), *argv], cwd=REPO)
    url = f"http://127.0.0.1:{port}/v1/models/{DATASET}/predict"
    try:
        # Its imports (torch, onnxruntime, kdray) take seconds, tens of them on a loaded machine.
        deadline = time.monotonic() + 300
        while True:
            try:
                asyncio.run(latencies(url, body, 1, warmup=0))
                break
            except (aiohttp.ClientError, OSError):
                if proc.poll() is not None:
                    raise RuntimeError(f"the plain app exited {proc.returncode}") from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        lat = asyncio.run(latencies(url, body, n, warmup))
        rps, lat16 = asyncio.run(throughput(url, body, 16, seconds))
        return lat, rps, lat16
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def serve_measure(
    uri: str,
    body: bytes,
    tmp: Path,
    batching: bool,
    n: int,
    seconds: float,
    full: bool,
    explain_n: int | None = None,
    warmup: int = 10,
    shap_nsamples: int | None = None,
    runtime: str = "onnx",
    latency: bool | None = None,
    ingress: str = DEFAULT_INGRESS,
) -> dict[str, object]:
    """``serve run`` on serve/config.yaml, measured; ``explain_n``: requests per /explain series
    (default max(10, n / 10)); ``shap_nsamples``: the service's default SHAP samples (default:
    the config's); ``runtime``: what the Gateway predicts with; ``latency``: measure the
    1-client /predict series (default: ``full``); ``ingress``: a key of
    :data:`kdray.serving.launch.INGRESS` (``direct`` is measured at the replica's own port)."""
    latency = full if latency is None else latency
    user_config = {"max_batch_size": 8 if batching else 1, "batch_wait_timeout_s": 0.0}
    # No auth: the plain app it is compared with has none either (loopback, a private Ray).
    app_args: dict[str, object] = {
        "tracking_uri": uri,
        "datasets": [DATASET],
        "auth": "none",
        "runtime": runtime,
    }
    if shap_nsamples is not None:
        app_args["shap_nsamples"] = shap_nsamples
    config = service_config(
        REPO / "serve" / "config.yaml",
        free_port(),
        args=app_args,
        deployments={"Gateway": {"user_config": user_config}},
    )
    name = f"serve-{'on' if batching else 'off'}-{runtime}-{ingress}"
    service = launch(config, tmp / name, cwd=REPO, ingress=ingress)
    out: dict[str, object] = {}
    try:
        started = time.monotonic()
        service.wait_ready()
        out["ready_s"] = time.monotonic() - started
        url = service.replica_url() if ingress == "direct" else service.url
        base = f"{url}/v1/models/{DATASET}"
        predict = f"{base}/predict"
        models = asyncio.run(_models(f"{service.url}/v1/models"))
        out["runtime"] = models[0]["student"]["runtime"]
        if latency:
            out["predict_1"] = asyncio.run(latencies(predict, body, n, warmup))
        out["rps_16"], out["lat_16"] = asyncio.run(throughput(predict, body, 16, seconds))
        if full:
            explain = f"{base}/explain"
            k = explain_n or max(10, n // 10)
            out["explain_fast"] = asyncio.run(
                latencies(f"{explain}?methods=feature_maps,gradcam", body, k, warmup)
            )
            out["explain_layer"] = asyncio.run(
                latencies(f"{explain}?methods=feature_maps,gradcam&render=layer", body, k, warmup)
            )
            out["explain_none"] = asyncio.run(
                latencies(f"{explain}?methods=feature_maps,gradcam&render=none", body, k, warmup)
            )
            out["explain_shap"] = asyncio.run(
                latencies(f"{explain}?methods=feature_maps,gradcam,shap", body, k, min(2, warmup))
            )
            out["explain_both"] = asyncio.run(
                latencies(
                    f"{explain}?methods=feature_maps,gradcam&model=both", body, k, min(2, warmup)
                )
            )
            out["explain_both_shap"] = asyncio.run(
                latencies(
                    f"{explain}?methods=feature_maps,gradcam,shap&model=both",
                    body,
                    min(5, k),
                    min(1, warmup),
                )
            )
            out["predict_under_shap"] = asyncio.run(
                predict_under_shap(
                    predict, f"{explain}?methods=shap", body, n, settle=min(2.0, seconds)
                )
            )
    finally:
        started = time.monotonic()
        service.stop()
        out["stop_s"] = time.monotonic() - started
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=15.0, help="duration of each 16-client load"
    )
    parser.add_argument("--requests", type=int, default=300, help="requests per latency series")
    parser.add_argument(
        "--explain-requests",
        type=int,
        default=None,
        help="requests per /explain series (default: max(10, requests / 10))",
    )
    parser.add_argument(
        "--warmup", type=int, default=10, help="warm-up requests before a latency series"
    )
    parser.add_argument(
        "--shap-nsamples",
        type=int,
        default=None,
        help="the service's SHAP samples per request (default: serve/config.yaml's)",
    )
    parser.add_argument(
        "--batching-off",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure a service with batching off (16 clients)",
    )
    parser.add_argument(
        "--torch-runtime",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure a service whose Gateway predicts with torch (runtime: torch)",
    )
    parser.add_argument(
        "--ingress",
        default="proxy,direct",
        help="ingress modes measured beside make serve's (haproxy): comma-separated keys of "
        "kdray.serving.launch.INGRESS; '' for none",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 s loads, 5 requests a series (1 for /explain), 1 warm-up, 8 SHAP samples, "
        "no service with batching off, on torch or in another ingress mode; the plain app once",
    )
    args = parser.parse_args()
    if args.quick:  # smaller defaults; options given explicitly still win
        parser.set_defaults(**QUICK)
        args = parser.parse_args()
    load = {
        "explain_n": args.explain_requests,
        "warmup": args.warmup,
        "shap_nsamples": args.shap_nsamples,
    }
    with tempfile.TemporaryDirectory(prefix="kdray-serve-bench-") as tmp_name:
        tmp = Path(tmp_name)
        ws = Workspace(tmp / "ws").create()
        uri, student_dir = register_models(ws)
        body = test_png()
        print(
            f"student 224x224 widths 16-32-64-128-128; request: {len(body) / 1024:.0f} KB 512x512 PNG; "
            f"{torch.get_num_threads()} cores visible to torch"
        )
        edge = ws.root / "edge"  # the student's ONNX export, as registered beside it
        cpu_ceiling, ceiling_how = ceiling(student_dir, edge, body, min(args.seconds, 10.0))
        # The plain app predicts as the headline service does (runtime: onnx), before the
        # services and again after them (below): the machine's drift falls on both sides.
        plain_runs = [
            run_plain(student_dir, edge, body, args.requests, args.seconds, tmp, args.warmup)
        ]
        on = serve_measure(uri, body, tmp, True, args.requests, args.seconds, True, **load)
        off = on_torch = None
        if args.batching_off:
            off = serve_measure(uri, body, tmp, False, args.requests, args.seconds, False, **load)

        def predict_only(**variant: str) -> dict[str, object]:
            """A batching service in another ingress mode or runtime: /predict only."""
            return serve_measure(
                uri,
                body,
                tmp,
                True,
                args.requests,
                args.seconds,
                False,
                latency=True,
                **variant,
                **load,
            )

        modes = {m: predict_only(ingress=m) for m in filter(None, args.ingress.split(","))}
        plain_torch = None
        if args.torch_runtime:
            on_torch = predict_only(runtime="torch")
            # Like for like on the other runtime too: the plain app on torch, once.
            plain_torch = run_plain(
                student_dir, None, body, args.requests, args.seconds, tmp, args.warmup
            )
        if not args.quick:  # quick: the run before the services only
            plain_runs.append(
                run_plain(student_dir, edge, body, args.requests, args.seconds, tmp, args.warmup)
            )
    plain_lat = [x for run in plain_runs for x in run[0]]
    plain_rps = statistics.mean(run[1] for run in plain_runs)
    plain_lat16 = [x for run in plain_runs for x in run[2]]

    p1 = on["predict_1"]
    print(f"\nGateway predicts with: {on['runtime']}")
    print(
        f"\n/predict 1 client: p50 {pct(p1, 50):.1f} ms, p99 {pct(p1, 99):.1f} ms (goal p50 <= 15 ms)"
    )
    print(
        f"plain FastAPI+uvicorn 1 client: p50 {pct(plain_lat, 50):.1f} ms, p99 {pct(plain_lat, 99):.1f} ms"
    )
    print(f"Serve / plain, p50 at 1 client: {pct(p1, 50) / pct(plain_lat, 50):.2f}x (goal <= 1.3x)")
    off_text = (
        f"off {off['rps_16']:.1f} req/s (p50 {pct(off['lat_16'], 50):.0f} ms), " if off else ""
    )
    print(
        f"16 clients: batching on {on['rps_16']:.1f} req/s (p50 {pct(on['lat_16'], 50):.0f} ms), "
        f"{off_text}plain {plain_rps:.1f} req/s"
    )
    if off:
        print(
            f"batching on / off, 16 clients: {on['rps_16'] / off['rps_16']:.2f}x "
            "(goal >= 2x on GPU replicas)"
        )
    print(f"Serve / plain, p50 at 16 clients: {pct(on['lat_16'], 50) / pct(plain_lat16, 50):.2f}x")
    print(
        f"CPU ceiling (decode + forward in one process, no HTTP; best: {ceiling_how}): "
        f"{cpu_ceiling:.1f} img/s; Serve with batching / ceiling: {on['rps_16'] / cpu_ceiling:.2f}x "
        f"(goal >= 0.7x)"
    )
    print(f"Serve / plain throughput, 16 clients: {on['rps_16'] / plain_rps:.2f}x")
    print(
        f"ingress {DEFAULT_INGRESS} (make serve): /predict p50 {pct(p1, 50):.1f} ms "
        f"({pct(p1, 50) / pct(plain_lat, 50):.2f}x plain), 16 clients {on['rps_16']:.1f} req/s "
        f"({on['rps_16'] / plain_rps:.2f}x plain); ready in {on['ready_s']:.0f} s, stopped in "
        f"{on['stop_s']:.0f} s"
    )
    for mode, m in modes.items():
        m1 = m["predict_1"]
        print(
            f"ingress {mode}: /predict p50 {pct(m1, 50):.1f} ms "
            f"({pct(m1, 50) / pct(plain_lat, 50):.2f}x plain, goal <= 1.3x), p99 "
            f"{pct(m1, 99):.1f} ms, 16 clients {m['rps_16']:.1f} req/s "
            f"({m['rps_16'] / plain_rps:.2f}x plain, goal >= 0.9x); ready in {m['ready_s']:.0f} s, "
            f"stopped in {m['stop_s']:.0f} s"
        )
    if on_torch:
        t1 = on_torch["predict_1"]
        print(
            f"runtime torch: /predict 1 client p50 {pct(t1, 50):.1f} ms, 16 clients "
            f"{on_torch['rps_16']:.1f} req/s; onnx / torch: p50 {pct(p1, 50) / pct(t1, 50):.2f}x, "
            f"throughput {on['rps_16'] / on_torch['rps_16']:.2f}x"
        )
        pt_lat, pt_rps, _ = plain_torch
        print(
            f"like for like on torch: plain app p50 {pct(pt_lat, 50):.1f} ms, {pt_rps:.1f} req/s; "
            f"Serve / plain (both torch): p50 {pct(t1, 50) / pct(pt_lat, 50):.2f}x, "
            f"throughput {on_torch['rps_16'] / pt_rps:.2f}x"
        )
    for key, label, goal in (
        ("explain_fast", "feature_maps+gradcam, student", "<= 60 ms"),
        ("explain_layer", "feature_maps+gradcam, student, render=layer", ""),
        ("explain_none", "feature_maps+gradcam, student, render=none", ""),
        ("explain_shap", "+ shap, student", "<= 1000 ms"),
        ("explain_both", "feature_maps+gradcam, model=both", ""),
        ("explain_both_shap", "all three, model=both", ""),
    ):
        values = on[key]
        print(
            f"/explain {label}: p50 {pct(values, 50):.0f} ms" + (f" (goal {goal})" if goal else "")
        )
    under = on["predict_under_shap"]
    print(
        f"predict p99 idle {pct(p1, 99):.1f} ms, under 4 SHAP clients {pct(under, 99):.1f} ms: "
        f"{pct(under, 99) / pct(p1, 99):.2f}x (goal <= 3x); p50 {pct(under, 50):.1f} ms"
    )
    print(f"medians for the record: predict {statistics.median(p1):.2f} ms")


if __name__ == "__main__":
    main()

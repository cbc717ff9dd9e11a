"""Mixed load on a running service: closed-loop clients asking for predictions and explanations.

    python -m kdray.serving.loadtest --url http://127.0.0.1:8000 --seconds 30 --clients 16 IMAGE...

Each client loops for ``seconds``: a prediction most of the time, feature maps + Grad-CAM of
the student or of both models sometimes, SHAP now and then, over every served dataset. Any
answer other than 200 counts as an error; the exit code is 1 if there was one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np

__all__ = ["LoadResult", "MIX", "run_load"]

# (share of requests, path suffix) for one dataset
MIX = (
    (0.70, "predict"),
    (0.15, "explain?methods=feature_maps,gradcam"),
    (0.10, "explain?methods=feature_maps,gradcam&model=both"),
    (0.05, "explain?methods=shap&model=both"),
)


@dataclass
class LoadResult:
    seconds: float
    latencies_ms: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(map(len, self.latencies_ms.values())) + len(self.errors)

    def summary(self) -> str:
        lines = [
            f"{self.requests} requests in {self.seconds:.1f} s "
            f"({self.requests / self.seconds:.1f}/s), {len(self.errors)} errors"
        ]
        for kind, values in sorted(self.latencies_ms.items()):
            lines.append(
                f"  {kind}: {len(values)} ok, p50 {np.percentile(values, 50):.0f} ms, "
                f"p99 {np.percentile(values, 99):.0f} ms"
            )
        lines += [f"  error: {e}" for e in self.errors[:10]]
        return "\n".join(lines)


async def _client(
    session: aiohttp.ClientSession,
    url: str,
    datasets: list[str],
    images: list[bytes],
    stop: float,
    rng: random.Random,
    result: LoadResult,
) -> None:
    shares, kinds = zip(*MIX, strict=True)
    while time.perf_counter() < stop:
        kind = rng.choices(kinds, weights=shares)[0]
        dataset, image = rng.choice(datasets), rng.choice(images)
        started = time.perf_counter()
        try:
            async with session.post(
                f"{url}/v1/models/{dataset}/{kind}",
                data=image,
                headers={"Content-Type": "image/png"},
            ) as response:
                body = await response.read()
                if response.status != 200:
                    result.errors.append(f"{kind} {dataset}: {response.status} {body[:200]!r}")
                    continue
        except (aiohttp.ClientError, TimeoutError) as exc:
            result.errors.append(f"{kind} {dataset}: {type(exc).__name__}: {exc}")
            continue
        result.latencies_ms.setdefault(kind, []).append((time.perf_counter() - started) * 1e3)


async def _run(
    url: str, images: list[bytes], seconds: float, clients: int, token: str | None, seed: int
) -> LoadResult:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(
        headers=headers, timeout=timeout, connector=aiohttp.TCPConnector(limit=clients + 4)
    ) as session:
        async with session.get(f"{url}/v1/models") as response:
            response.raise_for_status()
            datasets = [m["dataset"] for m in (await response.json())["models"]]
        if not datasets:
            raise RuntimeError(f"{url} serves no model")
        result = LoadResult(seconds)
        started = time.perf_counter()
        await asyncio.gather(
            *(
                _client(
                    session,
                    url,
                    datasets,
                    images,
                    started + seconds,
                    random.Random(seed + i),
                    result,
                )
                for i in range(clients)
            )
        )
        result.seconds = time.perf_counter() - started
        return result


def run_load(
    url: str,
    images: list[bytes],
    seconds: float = 30.0,
    clients: int = 16,
    token: str | None = None,
    seed: int = 0,
) -> LoadResult:
    """Run the mixed load (see :data:`MIX`) and return what happened."""
    return asyncio.run(_run(url.rstrip("/"), images, seconds, clients, token, seed))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kdray.serving.loadtest", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("images", nargs="+", type=Path, help="PNG files to send")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument(
        "--token-env", default="KDRAY_SERVE_TOKEN", help="env var with the bearer token"
    )
    args = parser.parse_args(argv)
    result = run_load(
        args.url,
        [p.read_bytes() for p in args.images],
        args.seconds,
        args.clients,
        os.environ.get(args.token_env),
    )
    print(result.summary())
    return 1 if result.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Readiness that no workload queue can block.

A replica's status call waits in the same queue as its requests: asked on every ``/readyz``, the
ShapExplainer's answer came after the SHAP work queued before it (10 s under 8 SHAP clients), and
a readiness probe with a 1 s timeout would have pulled a healthy service out of rotation exactly
when it was busiest. The Gateway instead keeps, per deployment, the last status it reported (the
models it loaded, their cards, its load errors), refreshed in the background, and asks Serve's
controller whether the deployment's replicas pass their health checks (those run beside the
request queue). ``/readyz`` and ``/v1/models`` read that board and never wait on a request queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["ReadinessBoard", "merge_cards", "serve_health"]

log = logging.getLogger("kdray.serve")
Status = dict[str, Any]  # kdray.serving.deployments.store_status's shape
# Serve's deployment states in which its replicas do not serve (UPDATING, UPSCALING and
# DOWNSCALING still have running replicas: their last reports stand).
NOT_SERVING = ("UNHEALTHY", "DEPLOY_FAILED")


def serve_health(app_name: str | None = None) -> dict[str, str]:
    """Each deployment's status as Serve's controller reports it (``HEALTHY``, ``UPDATING``,
    ``UNHEALTHY``...), for the application this replica belongs to. Blocking: call it in a thread.
    """
    from ray import serve

    if app_name is None:
        app_name = serve.get_replica_context().app_name
    application = serve.status().applications.get(app_name)
    if application is None:
        return {}
    return {name: str(d.status.value) for name, d in application.deployments.items()}


class ReadinessBoard:
    """The last status each deployment reported, and Serve's word on its health.

    Args:
        fetchers: deployment name -> coroutine function asking that deployment for its status.
        health: blocking function returning deployment name -> Serve status (``HEALTHY``...);
            None: reports alone decide.
        interval_s: between two background refreshes.
        timeout_s: how long one refresh waits for a deployment (a busy one keeps its last report).
    """

    def __init__(
        self,
        fetchers: dict[str, Callable[[], Awaitable[Status]]],
        health: Callable[[], dict[str, str]] | None = None,
        interval_s: float = 5.0,
        timeout_s: float = 30.0,
    ) -> None:
        self.fetchers, self.health = fetchers, health
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.reports: dict[str, Status] = {}
        self.failures: dict[str, str] = {}  # why the last refresh of a deployment got no report
        self.serve_status: dict[str, str] = {}
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()

    def start(self) -> None:
        """Start the background refresh (idempotent; needs a running event loop)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop())

    def poke(self) -> None:
        """Refresh now rather than at the next interval (e.g. a model was asked for and missing)."""
        self.start()
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception:  # never let the board die: the next round tries again
                log.exception("readiness refresh failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval_s)

    async def _fetch(self, name: str) -> None:
        try:
            report = await asyncio.wait_for(self.fetchers[name](), self.timeout_s)
        except Exception as exc:  # starting, restarting, gone, or busy past the timeout
            self.failures[name] = f"{type(exc).__name__}: {exc}"[:300]
            return
        self.reports[name] = report
        self.failures.pop(name, None)

    async def refresh(self) -> None:
        """Ask every deployment (concurrently) and Serve's controller once."""
        jobs = [self._fetch(name) for name in self.fetchers]
        if self.health is not None:
            jobs.append(self._fetch_health())
        await asyncio.gather(*jobs)

    async def _fetch_health(self) -> None:
        try:
            self.serve_status = await asyncio.wait_for(
                asyncio.to_thread(self.health), self.timeout_s
            )
        except Exception as exc:
            log.warning("Serve's deployment status unavailable: %s", exc)

    def statuses(self) -> dict[str, Status]:
        """Per deployment: its last report, made not-ready where Serve says it is unhealthy; a
        deployment that never reported is not ready ("starting", or why the asking failed)."""
        out: dict[str, Status] = {}
        for name in self.fetchers:
            serve_says = self.serve_status.get(name, "HEALTHY")
            report = self.reports.get(name)
            if report is None:
                reason = self.failures.get(name, "starting: no status reported yet")
                out[name] = {"ready": False, "loaded": [], "cards": {}, "errors": {name: reason}}
            elif serve_says in NOT_SERVING:
                out[name] = {
                    **report,
                    "ready": False,
                    "errors": {**report["errors"], name: f"Serve reports {serve_says}"},
                }
            else:
                out[name] = report
        return out


def merge_cards(cards: dict[str, dict[str, Any]], statuses: dict[str, Status]) -> None:
    """Fold every deployment's model cards into ``cards`` (dataset/role -> card), in place.

    The Gateway's cards win, as it predicts the students (their ``runtime`` is its), except
    their ``cam``: the explainers compute the CAM, so theirs says what computes it (the ONNX
    explain graph or torch, and why); the Gateway loads no explain graph and would always say
    torch.
    """
    for name, status in sorted(statuses.items(), key=lambda item: item[0] == "Gateway"):
        for key, card in status["cards"].items():
            cam = cards.get(key, {}).get("entry", {}).get("cam")
            if name == "Gateway" and cam is not None and "entry" in card:
                card = {**card, "entry": {**card["entry"], "cam": cam}}
            cards[key] = card

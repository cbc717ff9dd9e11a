"""Readiness from what each deployment last reported: never waits on a busy deployment."""

from __future__ import annotations

import asyncio
import time

from kdray.serving.readiness import ReadinessBoard

READY = {"ready": True, "loaded": ["a/student"], "cards": {"a/student": {}}, "errors": {}}


def test_a_busy_deployment_keeps_its_last_report_and_readiness_answers_at_once():
    async def scenario():
        busy = asyncio.Event()

        async def shap_status():
            if busy.is_set():
                await asyncio.sleep(3600)  # queued behind SHAP work
            return READY

        async def explainer_status():
            return READY

        board = ReadinessBoard(
            {"Explainer": explainer_status, "ShapExplainer": shap_status}, timeout_s=0.2
        )
        await board.refresh()
        assert all(s["ready"] for s in board.statuses().values())
        busy.set()
        started = time.perf_counter()
        await board.refresh()  # bounded by timeout_s, in the background in the Gateway
        assert time.perf_counter() - started < 1.0
        started = time.perf_counter()
        statuses = board.statuses()
        assert time.perf_counter() - started < 0.01
        assert statuses["ShapExplainer"]["ready"]  # busy is not broken
        assert "TimeoutError" in board.failures["ShapExplainer"]

    asyncio.run(scenario())


def test_a_deployment_that_never_reported_is_not_ready_and_says_why():
    async def failing():
        raise RuntimeError("replica starting")

    async def scenario():
        board = ReadinessBoard({"Explainer": failing})
        assert "starting" in board.statuses()["Explainer"]["errors"]["Explainer"]
        await board.refresh()
        status = board.statuses()["Explainer"]
        assert not status["ready"] and "replica starting" in status["errors"]["Explainer"]

    asyncio.run(scenario())


def test_serves_health_check_overrides_a_stale_report():
    verdict = {"Explainer": "HEALTHY"}

    async def ok():
        return READY

    async def scenario():
        board = ReadinessBoard({"Explainer": ok}, health=lambda: dict(verdict))
        await board.refresh()
        assert board.statuses()["Explainer"]["ready"]
        verdict["Explainer"] = "UNHEALTHY"
        await board.refresh()
        status = board.statuses()["Explainer"]
        assert not status["ready"] and "UNHEALTHY" in status["errors"]["Explainer"]

    asyncio.run(scenario())


def test_the_background_loop_refreshes_and_poke_refreshes_now():
    calls = []

    async def status():
        calls.append(time.perf_counter())
        return READY

    async def scenario():
        board = ReadinessBoard({"Explainer": status}, interval_s=60.0)
        board.start()
        await asyncio.sleep(0.05)
        assert len(calls) == 1
        board.poke()
        await asyncio.sleep(0.05)
        assert len(calls) == 2  # not 60 s later

    asyncio.run(scenario())


def test_model_cards_take_the_runtime_from_the_gateway_and_the_cam_from_the_explainers():
    from kdray.serving.readiness import merge_cards

    def status(runtime: str, computed_by: str) -> dict:
        entry = {"runtime": runtime, "cam": {"method": "hirescam", "computed_by": computed_by}}
        return {"cards": {"eye/student": {"title": "t", "entry": entry}}}

    cards: dict = {}
    # Before the explainers report, the Gateway's card stands as it is.
    merge_cards(cards, {"Gateway": status("onnx (predict.onnx)", "torch")})
    assert cards["eye/student"]["entry"]["cam"]["computed_by"] == "torch"
    statuses = {
        "Gateway": status("onnx (predict.onnx)", "torch"),
        "Explainer": status("onnx (model.onnx)", "onnx (model.onnx: feature maps and HiResCAM)"),
    }
    merge_cards(cards, statuses)
    entry = cards["eye/student"]["entry"]
    assert entry["runtime"] == "onnx (predict.onnx)"
    assert entry["cam"]["computed_by"] == "onnx (model.onnx: feature maps and HiResCAM)"
    assert statuses["Gateway"]["cards"]["eye/student"]["entry"]["cam"]["computed_by"] == "torch"
    merge_cards(cards, {"Gateway": status("onnx (predict.onnx)", "torch")})  # a later round
    assert cards["eye/student"]["entry"]["cam"]["computed_by"].startswith("onnx (model.onnx")

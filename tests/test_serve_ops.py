"""The service in operation, started as users start it (`make serve`): a new champion swapped in
under load without a failed request, replicas killed under load and recovered, nothing listening
beyond the configured host, and SIGTERM stopping everything (HAProxy included, after it reloaded
its config) so that a second `make serve` starts cleanly on the same port.

The scenario is ``benchmarks/serve_ops.py``'s (one run: its figures are printed with ``-s``); this
test holds its goals. Its own tiny registry (a 32 px brain_tumor student with its ONNX export;
teachers off), so it runs beside the smoke run's tests rather than after them.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys

import pytest

from conftest import REPO


def _scenario():
    spec = importlib.util.spec_from_file_location("serve_ops", REPO / "benchmarks" / "serve_ops.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["serve_ops"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.integration
def test_make_serve_swaps_a_champion_survives_killed_replicas_and_stops_on_sigterm(tmp_path):
    ops = _scenario()
    f = ops.run(tmp_path)
    print(json.dumps(f, indent=1, default=str))
    text = ops.report(f)  # what the benchmark prints: every figure a finite number
    print(text)
    assert len(text.splitlines()) == 7 and not re.search(r"\bnan\b|\binf\b", text), text
    port = f["port"]

    # Nothing the service started listens beyond its host (127.0.0.1 in serve/config.yaml).
    assert f"127.0.0.1:{port}" in f["haproxy"] and len(f["haproxy"]) >= 3, f["haproxy"]
    assert all(a.startswith("127.0.0.1:") for a in f["haproxy"]), f["haproxy"]
    assert f["gateway_http"], "the Gateway replica serves no HTTP (direct ingress off?)"
    assert all(a.startswith("127.0.0.1:") for a in f["gateway_http"]), f["gateway_http"]

    # A new champion under 16 clients: served, no failed request, p99 within 2x idle.
    swap = f["swap"]
    assert swap["after_s"] < 60 and swap["n"] > 100
    assert swap["failed"] == 0
    # No stall while the new version loads and is checked beside the old one: a request that
    # waited for the load would take seconds. The goal, p99 within 2x idle, is the benchmark's
    # (benchmarks/serve_ops.py alone: docs/serving.md); beside the other xdist worker's pipelines
    # one spike decides a p99 of a few hundred requests (256 ms against 2 x 99 ms seen, and 588 ms
    # against 2 x 159 ms in a fresh clone's suite), so the suite allows half a second on top: a
    # stall behind the load (1-1.5 s) would still fail it.
    assert swap["p99_during_s"] <= 2.0 * swap["p99_idle_s"] + 0.5, swap

    # Each replica killed under load: answering again within 30 s; failures only among the
    # requests in flight on it (at most one per client) and those sent before HAProxy saw its
    # socket close (a fraction of a second: 0.01-0.16 s measured, docs/serving.md); none after.
    for deployment, k in f["kills"].items():
        assert k["recovered_s"] is not None and k["recovered_s"] <= 30.0, (deployment, k)
        assert k["in_flight"] <= ops.CLIENTS and k["last_failed_sent_s"] < 1.0, (deployment, k)
        assert k["after_recovery"] > 0 and k["failed_after_recovery"] == 0, (deployment, k)

    # SIGTERM once HAProxy has reloaded its config: everything stops within 15 s.
    assert f["haproxy_reloaded"], "HAProxy never reloaded: the case the test is for did not occur"
    term = f["sigterm"]
    assert term["make_exited_s"] <= 15.0 and term["all_gone_s"] <= 15.0, term
    assert term["left"] == [] and term["haproxy_left"] == [], term
    assert not term["port_answers"]

    # A second `make serve` on the same port right after starts cleanly, on the new champion.
    assert f["second"]["version"] == "2"
    assert f["second"]["stopped_s"] <= 15.0


def test_two_services_on_one_machine_get_ports_of_their_own():
    """Ray Serve binds replicas on 30000 up and the fallback proxy on 8500, with SO_REUSEPORT:
    two services would share those ports and each other's requests. launch gives each its own.
    Here the first service's ports are held as Serve holds them (SO_REUSEPORT) while the second
    chooses."""
    import socket

    from kdray.serving.launch import REPLICA_PORTS, own_ports

    def ports(env: dict[str, str]) -> set[int]:
        blocks = {
            p
            for kind in ("HTTP", "GRPC")
            for p in range(
                int(env[f"RAY_SERVE_DIRECT_INGRESS_MIN_{kind}_PORT"]),
                int(env[f"RAY_SERVE_DIRECT_INGRESS_MAX_{kind}_PORT"]) + 1,
            )
        }
        assert len(blocks) == 2 * REPLICA_PORTS
        return blocks | {int(env[f"RAY_SERVE_FALLBACK_PROXY_{k}_PORT"]) for k in ("HTTP", "GRPC")}

    first = ports(own_ports("127.0.0.1"))
    assert not first & {8500, 9500, 30000, 40000}  # Ray's defaults, which every service shares
    held = []
    try:
        for port in first:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("127.0.0.1", port))
            s.listen()
            held.append(s)
        for _ in range(5):
            assert not ports(own_ports("127.0.0.1")) & first
    finally:
        for s in held:
            s.close()

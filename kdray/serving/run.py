"""``make serve``: the HTTP service in the foreground, stopped cleanly by Ctrl-C or SIGTERM.

    python -m kdray.serving.run [serve/config.yaml] [--port N] [--host H] [--set KEY=VALUE ...]

Runs ``serve run <config> --address local`` (a private Ray) with HAProxy in front of the
Gateway replica's own HTTP server (:data:`kdray.serving.launch.DEFAULT_INGRESS`), prints the
viewer's link with the API token, and stays in the foreground with Serve's output. Ctrl-C or
SIGTERM (what systemd, Docker and Kubernetes send) stops everything it started within 15 s:
Serve, its Ray, and every HAProxy process of this service, also one that reloaded its config
after a replica moved (:meth:`kdray.serving.launch.Service.stop`). The token is
``$KDRAY_SERVE_TOKEN``, else a new one per start.
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import threading
from pathlib import Path

__all__ = ["main"]

STOP_GRACE_S = 7.0  # Serve's graceful shutdown; then what is left is killed (15 s in all)


def build_parser(prog: str = "make serve") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve the registered champions (a Ray Serve config) on a private Ray, in "
        "the foreground; Ctrl-C or SIGTERM stops it and everything it started.",
    )
    parser.add_argument(
        "config", nargs="?", default="serve/config.yaml", help="Serve config (serve/config.yaml)"
    )
    parser.add_argument("--port", type=int, default=None, help="default: the config's")
    parser.add_argument("--host", default=None, help="default: the config's (127.0.0.1)")
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override an application arg (kdray.serving.settings), e.g. --set teacher=false "
        "--set reload_interval_s=5; repeatable; values are YAML",
    )
    return parser


def main(argv: list[str] | None = None, prog: str = "make serve") -> int:
    from kdray.serving.launch import launch, service_config

    args = build_parser(prog).parse_args(argv)
    base = Path(args.config)
    if not base.is_file():
        print(f"error: no Serve config {base}", file=sys.stderr)
        return 2
    import yaml

    port = args.port or yaml.safe_load(base.read_text())["http_options"]["port"]
    overrides = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            print(f"error: --set expects KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        overrides[key.strip()] = yaml.safe_load(value) if value.strip() else None
    config = service_config(base, port, args=overrides, host=args.host)
    try:  # a bad key or value is named now, not by a replica that fails to start
        from kdray.serving.settings import load_settings

        load_settings(config["applications"][0]["args"])
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    token = os.environ.get("KDRAY_SERVE_TOKEN") or secrets.token_urlsafe(24)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    work = Path(f"/tmp/kdray-serve-{os.getuid()}-{port}")
    service = launch(
        config,
        work,
        cwd=Path.cwd(),
        env={
            "KDRAY_SERVE_TOKEN": token,
            # Where the registry is (serve/config.yaml: tracking_uri null -> this workspace's).
            "KDRAY_HOME": os.environ.get("KDRAY_HOME", str(Path.cwd() / "workspace")),
        },
        log_to_file=False,
    )
    url = service.url  # the address a browser on this machine opens
    print(f"kdray: the viewer, signed in: {url}/#token={token}", flush=True)
    print(f"kdray: API calls: curl -H 'Authorization: Bearer {token}' {url}/v1/models", flush=True)
    try:
        while not stop.is_set() and service.process.poll() is None:
            stop.wait(0.5)
    finally:
        print("kdray: stopping the service", file=sys.stderr, flush=True)
        service.stop(timeout_s=STOP_GRACE_S)
    return 0 if stop.is_set() else (service.process.returncode or 1)


if __name__ == "__main__":
    sys.exit(main())

"""``python -m kdray.deploy.kuberay``: the RayService's ``serveConfigV2``, from ``serve/config.yaml``.

``serve/config.yaml`` is the one Serve config: ``make serve`` runs it on a laptop, and this command
writes it into ``deploy/kuberay/rayservice.yaml`` with what a Kubernetes cluster needs changed
(:data:`CLUSTER_CHANGES`, printed on every run). Only the ``serveConfigV2: |`` block of the
manifest is rewritten; the rest, comments included, is left as it is. ``--check`` writes nothing
and exits 1 when the block on disk is not what the command would write (a stale manifest), or
when the manifest does not give the application what it reads from its pods (the API token from a
Secret, the port Serve listens on).

Before anything is written the result is validated with Ray Serve's own schema
(``ray.serve.schema.ServeDeploySchema``) and kdray's application ``args``
(:class:`kdray.serving.settings.ServeSettings`), so a bad Serve config fails here, not in the
cluster.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import re
import sys
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "CLUSTER_CHANGES",
    "DEFAULT_MANIFEST",
    "DEFAULT_SERVE_CONFIG",
    "ManifestError",
    "cluster_serve_config",
    "main",
    "manifest_problems",
    "render_manifest",
]

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SERVE_CONFIG = REPO / "serve" / "config.yaml"
DEFAULT_MANIFEST = REPO / "deploy" / "kuberay" / "rayservice.yaml"
COMMAND = "python -m kdray.deploy.kuberay"
KDRAY_APPS = ("serve.app:build_app", "kdray.serving.app:build_app")

CLUSTER_CHANGES = (
    "http_options.host: 0.0.0.0 - KubeRay's serve Service and its readiness probe reach Serve's "
    "proxy on the pod's IP; serve/config.yaml answers on loopback only",
    "applications[].args.tracking_uri: null - the registry is the pods' $MLFLOW_TRACKING_URI, "
    "never a path on the machine that generated the manifest",
    "deployments with ray_actor_options.num_cpus 0: 1 - a replica that reserves no CPU may land "
    "on the head, whose num-cpus is 0 to keep heavy work off it",
)

# A literal block scalar: `serveConfigV2: |` (chomping indicator allowed), alone on its line.
_BLOCK_KEY = re.compile(r"^(?P<indent>[ ]*)serveConfigV2:[ ]*\|[+-]?[ ]*(#.*)?\n", re.MULTILINE)


class ManifestError(ValueError):
    """The Serve config or the manifest cannot give a valid RayService."""


def cluster_serve_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (``serve/config.yaml``, parsed) with :data:`CLUSTER_CHANGES` applied, validated.

    Raises:
        ManifestError: Ray Serve's schema or kdray's application ``args`` refuse the result.
    """
    out = copy.deepcopy(config)
    out.setdefault("http_options", {})["host"] = "0.0.0.0"
    for app in out.get("applications") or []:
        if app.get("import_path") in KDRAY_APPS:
            app.setdefault("args", {})["tracking_uri"] = None
        for deployment in app.get("deployments") or []:
            options = deployment.get("ray_actor_options") or {}
            if options.get("num_cpus") == 0:
                options["num_cpus"] = 1
    _validate(out)
    return out


def _validate(config: dict[str, Any]) -> None:
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    from kdray.config import ConfigError
    from kdray.serving.settings import load_settings

    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as exc:
        raise ManifestError(f"Ray Serve refuses the config:\n{exc}") from None
    for app in config["applications"]:
        if app.get("import_path") in KDRAY_APPS:
            try:
                load_settings(app.get("args"))
            except ConfigError as exc:
                raise ManifestError(f"application {app.get('name')!r}: {exc}") from None


def render_manifest(manifest_text: str, serve_config: dict[str, Any]) -> str:
    """``manifest_text`` with its ``serveConfigV2`` block replaced by ``serve_config``.

    Raises:
        ManifestError: the manifest has no single ``serveConfigV2: |`` block, or the rewritten
            manifest does not read back as ``serve_config``.
    """
    keys = list(_BLOCK_KEY.finditer(manifest_text))
    if len(keys) != 1:
        raise ManifestError(
            f"expected one `serveConfigV2: |` line (a literal block) in the manifest, "
            f"found {len(keys)}"
        )
    key = keys[0]
    outer = key["indent"]
    rest = manifest_text[key.end() :].splitlines(keepends=True)
    # The block: the lines after the key that are blank or indented deeper than it. Blank lines
    # at its end belong to what follows.
    end = 0
    while end < len(rest) and (not rest[end].strip() or rest[end].startswith(outer + " ")):
        end += 1
    while end and not rest[end - 1].strip():
        end -= 1
    body = yaml.safe_dump(serve_config, sort_keys=False, default_flow_style=False, width=1000)
    inner = outer + "  "
    block = "".join(inner + line if line.strip() else line for line in body.splitlines(True))
    text = manifest_text[: key.start()] + f"{outer}serveConfigV2: |\n" + block + "".join(rest[end:])
    if yaml.safe_load(_serve_config_text(yaml.safe_load(text))) != serve_config:
        raise ManifestError("the rewritten serveConfigV2 does not read back as the config")
    return text


def _serve_config_text(manifest: dict[str, Any]) -> str:
    try:
        return manifest["spec"]["serveConfigV2"]
    except (KeyError, TypeError):
        raise ManifestError("the manifest has no spec.serveConfigV2") from None


def _ray_containers(manifest: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(group, Ray container) of the head and every worker group: KubeRay's container 0."""
    try:
        cluster = manifest["spec"]["rayClusterConfig"]
        groups = [("head", cluster["headGroupSpec"])]
        groups += [(g["groupName"], g) for g in cluster.get("workerGroupSpecs") or []]
        return [(name, group["template"]["spec"]["containers"][0]) for name, group in groups]
    except (KeyError, IndexError, TypeError) as exc:
        raise ManifestError(
            f"the manifest has no Ray container where KubeRay looks: {exc}"
        ) from None


def manifest_problems(manifest: dict[str, Any], serve_config: dict[str, Any]) -> list[str]:
    """What the RayService ``manifest`` fails to give the application of ``serve_config``.

    Every Ray container must get each kdray application's token variable (``args.token_env``,
    with ``auth: token``) from a Secret, never as a literal, and must expose Serve's HTTP port
    under the name ``serve`` (KubeRay builds the serve Service and its probe from it).
    """
    problems = []
    settings = [app.get("args") or {} for app in serve_config.get("applications") or []]
    token_envs = sorted(
        {a.get("token_env", "KDRAY_SERVE_TOKEN") for a in settings if a.get("auth") != "none"}
    )
    port = (serve_config.get("http_options") or {}).get("port", 8000)
    for group, container in _ray_containers(manifest):
        env = {e["name"]: e for e in container.get("env") or []}
        for name in token_envs:
            source = env.get(name, {})
            if "value" in source:
                problems.append(f"{group}: ${name} is a literal value; take it from a Secret")
            elif "secretKeyRef" not in (source.get("valueFrom") or {}):
                problems.append(f"{group}: ${name} is not set from a secretKeyRef")
        ports = {p.get("name"): p.get("containerPort") for p in container.get("ports") or []}
        if ports.get("serve") != port:
            problems.append(
                f"{group}: container port 'serve' is {ports.get('serve')}, Serve listens on {port}"
            )
    return problems


def _relative(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=COMMAND,
        description="Write serve/config.yaml, with what a Kubernetes cluster needs changed, into "
        "the RayService manifest's serveConfigV2 (the rest of the file is kept as it is).",
    )
    parser.add_argument("--serve-config", type=Path, default=DEFAULT_SERVE_CONFIG, metavar="PATH")
    parser.add_argument("--manifest", type=Path, default=DEFAULT_MANIFEST, metavar="PATH")
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if the manifest's serveConfigV2 is stale or the manifest "
        "does not give the application its token from a Secret and its port",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    source, target = _relative(args.serve_config), _relative(args.manifest)
    try:
        config = yaml.safe_load(args.serve_config.read_text())
        if not isinstance(config, dict):
            raise ManifestError(f"{source} is not a mapping")
        wanted = cluster_serve_config(config)
        current = args.manifest.read_text()
        text = render_manifest(current, wanted)
        problems = manifest_problems(yaml.safe_load(text), wanted)
    except (OSError, yaml.YAMLError, ManifestError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stale = text != current
    if args.check:
        if stale:
            diff = difflib.unified_diff(
                current.splitlines(True), text.splitlines(True), target, f"{target} (wanted)"
            )
            print(
                f"error: {target}: serveConfigV2 differs from what {source} gives; run "
                f"`{COMMAND}` to rewrite it:\n" + "".join(list(diff)[:60]),
                file=sys.stderr,
            )
        for problem in problems:
            print(f"error: {target}: {problem}", file=sys.stderr)
        if stale or problems:
            return 1
        print(f"{target}: serveConfigV2 is {source} for the cluster; the manifest fits it")
        return 0
    if stale:
        args.manifest.write_text(text)
    print(f"{target}: serveConfigV2 {'written' if stale else 'unchanged'}, from {source} with:")
    print("".join(f"  - {change}\n" for change in CLUSTER_CHANGES), end="")
    for problem in problems:
        print(f"warning: {target}: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

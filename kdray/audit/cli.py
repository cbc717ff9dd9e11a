"""``tune/audit.py``: audit a whole dataset with the registered champion and its teacher."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from kdray.command import (
    POST_RUN_CONFIG_HELP,
    add_address,
    address_overrides,
    command_parser,
    setup_logging,
    usage_error,
)
from kdray.config import ConfigError
from kdray.data.folders import DataError
from kdray.data.specs import DATASETS
from kdray.workspace import Workspace, WorkspaceError

__all__ = ["audit_main", "build_audit_parser"]

log = logging.getLogger("kdray.audit")


def build_audit_parser(prog: str = "tune/audit.py") -> argparse.ArgumentParser:
    parser = command_parser(
        prog,
        "Audit a whole dataset on Ray Data: every image predicted and explained (feature maps, "
        "Grad-CAM, optionally SHAP) by the registered student (kdray-<dataset>@champion) and "
        "its teacher, scored (agreement, confidence, localisation on lesion masks, map "
        "agreement), and the cases to look at first ranked in audit.md. Writes a Parquet table "
        "(one row per file) and logs everything as an MLflow run in the '<experiment>-audit' "
        "experiment. The model's own test split is audited, at its own input size, with the "
        "config of the run that trained it; --config and --set override that config (a config "
        "that would give the model other data is refused).",
        "override a key of the run's config (explain.* keys choose layers, top-k channels, "
        "SHAP samples)",
        config_help=POST_RUN_CONFIG_HELP,
    )
    parser.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    parser.add_argument(
        "--root",
        metavar="DIR",
        default=None,
        help="audit this folder instead of the workspace's split: a Kaggle layout (class "
        "folders, labelled) or any folder of images (unlabelled: agreement and confidence are "
        "audited, accuracy is not); broken files are listed, not fatal",
    )
    parser.add_argument(
        "--masks-root", metavar="DIR", default=None, help="lesion masks mirroring --root's tree"
    )
    parser.add_argument(
        "--split",
        default=None,
        choices=["train", "val", "test", "all"],
        help="which split (default: test for the workspace, all for --root)",
    )
    parser.add_argument(
        "--methods",
        default="feature_maps,gradcam",
        help="comma-separated: feature_maps, gradcam, shap (default: feature_maps,gradcam)",
    )
    parser.add_argument(
        "--shap-sample",
        type=int,
        default=100,
        metavar="N",
        help="with shap: explain a seeded sample of N images (SHAP costs explain.shap_nsamples "
        "passes per image; default 100)",
    )
    parser.add_argument("--alias", default="champion", help="registry alias (default: champion)")
    parser.add_argument(
        "--student-only", action="store_true", help="audit the student without its teacher"
    )
    parser.add_argument(
        "--actors", type=int, default=None, help="actors (default: the cluster's CPUs / CPUs each)"
    )
    parser.add_argument(
        "--cpus-per-actor",
        type=float,
        default=1.0,
        help="CPUs per actor, also its torch threads (default 1)",
    )
    parser.add_argument(
        "--gpus-per-actor", type=float, default=0.0, help="GPUs per actor (default 0: CPU)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="images per batch (default: up to 32)"
    )
    parser.add_argument("--top", type=int, default=10, help="rows per look-first list (default 10)")
    parser.add_argument(
        "--out", metavar="DIR", default=None, help="default: <workspace>/reports/audits/<id>"
    )
    parser.add_argument("--no-log", action="store_true", help="write the folder only, no MLflow")
    add_address(
        parser,
        "Ray cluster to join, e.g. ray://head:10001 (default: $RAY_ADDRESS, else a new local Ray)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="print Ray's output on the terminal too"
    )
    return parser


def _check(args: argparse.Namespace) -> str | None:
    for name in ("actors", "batch_size", "top"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return f"--{name.replace('_', '-')} must be at least 1"
    if args.shap_sample < 0:
        return "--shap-sample must be 0 or more"
    if args.cpus_per_actor <= 0 or args.gpus_per_actor < 0:
        return "--cpus-per-actor must be above 0 and --gpus-per-actor 0 or more"
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = sorted(set(methods) - {"feature_maps", "gradcam", "shap"})
    if bad or not methods:
        return f"--methods: unknown {bad}; choose from feature_maps, gradcam, shap"
    return None


def audit_main(argv: list[str] | None = None, prog: str = "tune/audit.py") -> int:
    args = build_audit_parser(prog).parse_args(argv)
    setup_logging()
    overrides = [*args.overrides, *address_overrides(args)]
    problem = _check(args)
    if problem:
        return usage_error(problem)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow.exceptions import MlflowException

    from kdray.audit.run import AuditRequest, prepare_audit, run_audit
    from kdray.console import calm_console, log_path_for
    from kdray.lineage import LineageError, post_run_config
    from kdray.session import ray_session

    ws = Workspace.at(args.workspace)
    try:
        # The model's own config and data: what it saw decides what "the test split" is.
        cfg, lineage = post_run_config(
            args.config,
            overrides,
            ws,
            args.dataset,
            args.alias,
            check_data=args.root is None,
            way_out="or pass --root DIR to audit another folder at the model's input size",
        )
    except (ConfigError, LineageError) as exc:
        return usage_error(exc)
    except MlflowException as exc:
        return usage_error(f"kdray-{args.dataset}@{args.alias}: {exc.message}")

    request = AuditRequest(
        dataset=args.dataset,
        root=args.root,
        masks_root=args.masks_root,
        split=args.split,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        shap_sample=args.shap_sample,
        alias=args.alias,
        teacher=not args.student_only,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        batch_size=args.batch_size,
        top=args.top,
        out=args.out,
        log_mlflow=not args.no_log,
        lineage=lineage,
    )
    log_path = None
    try:
        ws.check()
        # The listing and the registry first: a bad folder or a missing alias is an error in
        # seconds, before Ray starts.
        prepared = prepare_audit(cfg, ws, request)
        log_path = None if args.verbose else log_path_for(ws.logs)
        with calm_console(log_path, verbose=args.verbose), ray_session(cfg.ray, ws):
            result = run_audit(cfg, ws, request, prepared=prepared)
            # Ray Data's operator stats into the run's log (the terminal with -v).
            print(f"Ray Data stats of the audit:\n{result.stats}", file=sys.stderr)
    except (DataError, WorkspaceError, LineageError) as exc:
        return usage_error(exc)
    except MlflowException as exc:
        return usage_error(f"kdray-{args.dataset}@{args.alias}: {exc.message}")
    except KeyboardInterrupt:
        print("interrupted: the audit wrote nothing; run it again", file=sys.stderr)
        return 130
    except Exception:
        traceback.print_exc()
        if log_path:
            print(f"kdray audit failed; Ray's output is in {log_path}", file=sys.stderr)
        return 1
    m = result.metrics
    print(f"audit of {args.dataset}: {int(m['images'])} images, {int(m['unreadable'])} unreadable")
    for role in ("student", "teacher"):
        if f"{role}.accuracy" in m:
            print(f"  {role} accuracy {m[f'{role}.accuracy']:.3f}, ECE {m[f'{role}.ece']:.3f}")
    if "agreement.predictions" in m:
        print(f"  teacher-student agreement {m['agreement.predictions']:.3f}")
    print(f"  {m['rows_per_s']:.1f} images/s on {int(m['actors'])} actor(s)")
    print("look first:")
    for case in result.cases:
        print(f"  {case.title}: {case.matched}")
    print(f"report: {result.markdown}\ntable: {result.table}")
    if result.run_url:
        from kdray.audit.run import audit_experiment
        from kdray.tracking import resolve_tracking_uri

        uri = resolve_tracking_uri(cfg.mlflow, ws)
        hint = "" if uri.startswith("http") else f" (mlflow ui --backend-store-uri {uri})"
        print(f"MLflow run ({audit_experiment(cfg)}): {result.run_url}{hint}")
    return 0

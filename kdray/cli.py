"""``python tune/run.py``: the command-line front of :func:`kdray.pipeline.run_pipeline`."""

from __future__ import annotations

import argparse
import logging
import sys

from kdray.config import DEFAULT_CONFIG, ConfigError, load_config
from kdray.data.folders import DataError
from kdray.workspace import Workspace

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tune/run.py",
        description="Train a DenseNet121 teacher per dataset with Ray Train, search KD students "
        "(alpha, temperature, width) with Ray Tune, log every run to MLflow and score the best "
        "student on the test split.",
    )
    parser.add_argument("--config", metavar="PATH", default=str(DEFAULT_CONFIG),
                        help="experiment YAML (default: configs/default.yaml)")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="override one config key, e.g. --set kd.alpha=0.3 "
                        "--set data.datasets=[brain_tumor]; repeatable; values are YAML")
    parser.add_argument("--workspace", metavar="DIR", default=None,
                        help="where data, models, mlflow.db and Ray results live "
                        "(default: $KDRAY_HOME, else ./workspace)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the last run of this config in this workspace after it was "
                        "stopped: finished datasets are kept, the unfinished sweep resumes")
    parser.add_argument("--address", metavar="ADDR", default=None,
                        help="Ray cluster to join (default: $RAY_ADDRESS, else a new local Ray)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s kdray %(message)s", datefmt="%H:%M:%S")
    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"ray.address={args.address}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Imported here so --help and config errors answer without loading Ray and torch.
    from kdray.pipeline import format_summary, run_pipeline

    ws = Workspace.at(args.workspace)
    try:
        rows = run_pipeline(cfg, ws, resume=args.resume)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: continue with the same command and --resume", file=sys.stderr)
        return 130
    print(format_summary(rows))
    print(f"\nsummary written to {ws.reports / 'summary.md'}; MLflow: mlflow ui --backend-store-uri "
          f"sqlite:///{ws.mlflow_db}")
    return 0


def report_main(argv: list[str] | None = None) -> int:
    """``python tune/report.py``: rebuild the transparency reports of a finished run."""
    parser = argparse.ArgumentParser(
        prog="tune/report.py",
        description="Recompute the transparency report (params, FLOPs, explanation times, "
        "faithfulness, example figures; teacher vs champion) of every dataset of a finished "
        "`tune/run.py` run with the same config and workspace, and log it to MLflow.",
    )
    parser.add_argument("--config", metavar="PATH", default=str(DEFAULT_CONFIG),
                        help="the run's experiment YAML (default: configs/default.yaml)")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="the run's overrides; explain.* keys may differ from the run's")
    parser.add_argument("--workspace", metavar="DIR", default=None,
                        help="the run's workspace (default: $KDRAY_HOME, else ./workspace)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s kdray %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from kdray.pipeline import rebuild_reports

    try:
        paths = rebuild_reports(cfg, Workspace.at(args.workspace))
    except (RuntimeError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0

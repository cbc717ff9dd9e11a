"""Command-line fronts: ``tune/run.py`` (:func:`main`) and ``tune/report.py`` (:func:`report_main`)."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback

from kdray.config import ConfigError, ExperimentConfig, load_config
from kdray.data.folders import DataError
from kdray.workspace import Workspace, WorkspaceError

__all__ = ["build_parser", "build_report_parser", "main", "report_main"]


POST_RUN_CONFIG_HELP = (
    "experiment YAML (default: the config of the run that trained the model; a config that "
    "would give the model other data, e.g. another image size, is refused)"
)


def _parser(
    prog: str,
    description: str,
    set_help: str,
    config_help: str = "experiment YAML (default: configs/default.yaml)",
) -> argparse.ArgumentParser:
    """A parser with the options every command shares: --config, --set, --workspace.

    ``--config`` defaults to None: ``tune/run.py`` then loads configs/default.yaml, the post-run
    commands the config of the run that trained the model (:mod:`kdray.lineage`)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", metavar="PATH", default=None, help=config_help)
    parser.add_argument(
        "--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[], help=set_help
    )
    parser.add_argument(
        "--workspace",
        metavar="DIR",
        default=None,
        help="where data, models, mlflow.db and Ray results live "
        "(default: $KDRAY_HOME, else ./workspace)",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "tune/run.py",
        "Train a DenseNet121 teacher per dataset with Ray Train, search KD students (alpha, "
        "temperature, width, depth, lr) with Ray Tune, log every run to MLflow, register the "
        "champion, search its CE-only baseline (lr, same budget) and write the transparency "
        "report.",
        "override one config key, e.g. --set kd.alpha=0.3 --set data.datasets=[brain_tumor]; "
        "repeatable; values are YAML",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the last run of this config in this workspace after it was "
        "stopped: finished datasets are kept, the unfinished sweep resumes",
    )
    parser.add_argument(
        "--address",
        metavar="ADDR",
        default=None,
        help="Ray cluster to join (default: $RAY_ADDRESS, else a new local Ray)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print Ray's, Tune's and MLflow's output on the terminal too (default: "
        "kdray's progress lines there, everything in <workspace>/logs/run-*.log)",
    )
    return parser


def build_report_parser() -> argparse.ArgumentParser:
    return _parser(
        "tune/report.py",
        "Recompute the transparency report (params, FLOPs, explanation times, faithfulness, "
        "example figures; teacher vs champion) of every dataset of a finished `tune/run.py` run "
        "in the workspace, and log it to MLflow. No training. Without --config, each dataset's "
        "run is rebuilt with the config it was made with.",
        "override a key of the run's config; explain.* keys may differ from the run's",
        config_help="the run's experiment YAML (default: the config each finished run in the "
        "workspace was made with)",
    )


def _setup(args: argparse.Namespace, extra: list[str]) -> ExperimentConfig | None:
    """Logging plus the validated config; None (after printing the error) on a config error."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s kdray %(message)s", datefmt="%H:%M:%S"
    )
    try:
        return load_config(args.config, [*args.overrides, *extra])
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = _setup(args, [f"ray.address={args.address}"] if args.address else [])
    if cfg is None:
        return 2
    from kdray.console import calm_console, log_path_for
    from kdray.data.prepare import preflight

    ws = Workspace.at(args.workspace)
    log_path = None
    try:
        ws.check()
        log_path = None if args.verbose else log_path_for(ws.logs)
        with calm_console(log_path, verbose=args.verbose):
            preflight(cfg.data, ws)
            # Imported once the inputs are known good: a bad workspace, config or data file is
            # reported in about a second, not after the seconds torch, Ray and MLflow take.
            from kdray.pipeline import run_pipeline

            rows = run_pipeline(cfg, ws, resume=args.resume, checked=True)
    except (DataError, WorkspaceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted: continue with the same command and --resume"
            + (f" (full log: {log_path})" if log_path else ""),
            file=sys.stderr,
        )
        return 130
    except Exception:
        traceback.print_exc()
        if log_path:
            print(
                f"kdray failed; Ray's and Tune's output before the error is in {log_path}",
                file=sys.stderr,
            )
        return 1
    from kdray.pipeline import format_summary
    from kdray.tracking import Tracker, compare_url, ui_hint

    print(format_summary(rows))
    tracker = Tracker.open(cfg.mlflow, ws)
    print(
        f"\nsummary written to {ws.reports / 'summary.md'}\n"
        f"{ui_hint(tracker.tracking_uri, tracker.experiment_id)}"
    )
    for row in rows:  # a saved view per dataset: its KD trials side by side
        trials = tracker.child_runs(row.parent_run_id, "trial")
        print(
            f"  {row.dataset}'s {len(trials)} KD trials compared: "
            f"{compare_url(tracker.tracking_uri, tracker.experiment_id, trials)}"
        )
    return 0


def report_main(argv: list[str] | None = None) -> int:
    args = build_report_parser().parse_args(argv)
    cfg = _setup(args, [])
    if cfg is None:
        return 2
    from kdray.pipeline import finished_runs, rebuild_reports

    ws = Workspace.at(args.workspace)
    try:
        given = args.config is not None
        runs = (
            [(d, cfg) for d in cfg.data.datasets]
            if given
            else finished_runs(ws, args.overrides, cfg)
        )
        paths = rebuild_reports(runs, ws, given=given)
    except (RuntimeError, DataError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0

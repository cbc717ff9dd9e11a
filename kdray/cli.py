"""``kdray run`` / ``tune/run.py`` (:func:`main`) and ``kdray report`` / ``tune/report.py``
(:func:`report_main`); the options every command shares are in :mod:`kdray.command`."""

from __future__ import annotations

import argparse
import sys
import traceback

from kdray.command import (
    add_address,
    address_overrides,
    command_parser,
    setup_logging,
    usage_error,
)
from kdray.config import ConfigError, ExperimentConfig, load_config
from kdray.data.folders import DataError
from kdray.workspace import Workspace, WorkspaceError

__all__ = ["build_parser", "build_report_parser", "main", "report_main"]


def build_parser(prog: str = "tune/run.py") -> argparse.ArgumentParser:
    parser = command_parser(
        prog,
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
    add_address(parser, "Ray cluster to join (default: $RAY_ADDRESS, else a new local Ray)")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print Ray's, Tune's and MLflow's output on the terminal too (default: "
        "kdray's progress lines there, everything in <workspace>/logs/run-*.log)",
    )
    return parser


def build_report_parser(prog: str = "tune/report.py") -> argparse.ArgumentParser:
    return command_parser(
        prog,
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
    setup_logging()
    try:
        return load_config(args.config, [*args.overrides, *extra])
    except ConfigError as exc:
        usage_error(exc)
        return None


def main(argv: list[str] | None = None, prog: str = "tune/run.py") -> int:
    args = build_parser(prog).parse_args(argv)
    cfg = _setup(args, address_overrides(args))
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
        return usage_error(exc)
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
    from kdray.summary import format_summary
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


def report_main(argv: list[str] | None = None, prog: str = "tune/report.py") -> int:
    args = build_report_parser(prog).parse_args(argv)
    cfg = _setup(args, [])
    if cfg is None:
        return 2
    from kdray.rebuild import finished_runs, rebuild_reports

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
        return usage_error(exc)
    for path in paths:
        print(path)
    return 0

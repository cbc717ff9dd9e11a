"""``tune/export.py``: a registered student as ONNX, checked against torch, logged beside it."""

from __future__ import annotations

import argparse
import os

import numpy as np

from kdray.command import POST_RUN_CONFIG_HELP, command_parser, setup_logging, usage_error
from kdray.config import ConfigError
from kdray.data.folders import DataError
from kdray.data.specs import DATASETS
from kdray.workspace import Workspace, WorkspaceError

__all__ = ["build_export_parser", "export_main"]


def build_export_parser(prog: str = "tune/export.py") -> argparse.ArgumentParser:
    parser = command_parser(
        prog,
        "Export a registered student (default kdray-<dataset>@champion) to ONNX: model.onnx "
        "(logits, probabilities, per-block feature maps, the model's CAM) and predict.onnx, with "
        "model.json; both are checked against torch on the workspace's test split (logits and "
        "probabilities within 1e-4, maps within 1e-3, same labels; the CAM on the images without "
        "a near tie in a max-pool window, docs/edge.md) and logged as the onnx/ artifact of the version's "
        "run. `tune/run.py` does this for every champion (export.onnx). The parity images are "
        "the model's own test split at its own input size, from the config of the run that "
        "trained it; --config and --set override that config (a config that would give the "
        "model other data is refused).",
        "override a key of the run's config",
        config_help=POST_RUN_CONFIG_HELP,
    )
    parser.add_argument("--dataset", required=True, choices=sorted(DATASETS))
    parser.add_argument("--alias", default="champion", help="registry alias (default: champion)")
    parser.add_argument(
        "--out", metavar="DIR", default=None, help="default: <workspace>/edge/<dataset>"
    )
    parser.add_argument(
        "--images",
        type=int,
        default=None,
        metavar="N",
        help="test images the parity check runs on (default: export.parity_images, 64)",
    )
    parser.add_argument(
        "--int8",
        action="store_true",
        help="also write predict.int8.onnx (onnxruntime static quantisation, calibrated on 256 "
        "training images) and report its test accuracy change and speed",
    )
    parser.add_argument(
        "--no-log", action="store_true", help="write the folder only; log nothing to MLflow"
    )
    return parser


def export_main(argv: list[str] | None = None, prog: str = "tune/export.py") -> int:
    args = build_export_parser(prog).parse_args(argv)
    setup_logging()
    if args.images is not None and args.images < 1:
        return usage_error("--images must be at least 1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow.exceptions import MlflowException

    from kdray.data.prepare import prepare_dataset
    from kdray.edge.export import ExportError
    from kdray.edge.publish import export_registered
    from kdray.lineage import LineageError, check_manifest, post_run_config
    from kdray.registry import registered_name
    from kdray.tracking import resolve_tracking_uri

    ws = Workspace.at(args.workspace)
    name = registered_name(args.dataset)
    out = args.out or ws.edge / args.dataset
    try:
        # The model's own config and data: its test split at its input size.
        cfg, lineage = post_run_config(args.config, args.overrides, ws, args.dataset, args.alias)
        data = prepare_dataset(cfg.data, args.dataset, ws)
        check_manifest(data.manifest, lineage)
        test = data.splits["test"]
        n = args.images or cfg.export.parity_images
        export, registered = export_registered(
            name,
            args.alias,
            test.images[:n],
            out,
            resolve_tracking_uri(cfg.mlflow, ws),
            log=not args.no_log,
            version=lineage.version,
        )
    except (ConfigError, LineageError, DataError, WorkspaceError, ExportError) as exc:
        return usage_error(exc)
    except MlflowException as exc:
        return usage_error(f"{name}@{args.alias}: {exc.message}")
    print(f"{name} v{registered.version} ({args.alias}) exported to {export.directory}")
    print(f"  parity: {export.parity.describe()}")
    print(
        f"  {export.card['cam_method']} at {export.card['cam_layer']}, opset {export.card['opset']}"
    )
    if not args.no_log:
        print(f"  logged as onnx/ of run {registered.run_id}")
    if args.int8:
        from kdray.edge.quantize import quantize_predict

        train = data.splits["train"].images
        pick = np.random.default_rng(cfg.seed).permutation(len(train))[:256]
        report = quantize_predict(export.directory, train[np.sort(pick)], test.images, test.labels)
        print(f"  {report.describe()}")
    print(
        f"  predict and explain without torch: python examples/edge_predict.py IMAGE "
        f"--model {export.directory}"
    )
    return 0

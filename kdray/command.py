"""What every kdray command shares: its parser's common options, logging and the error line.

``kdray run|report|audit|export`` (:mod:`kdray.__main__`) and the ``tune/*.py`` entry points build
their parsers with :func:`command_parser` (``--config``, ``--set``, ``--workspace``), set logging
up with :func:`setup_logging` and report a bad input with :func:`usage_error`: one line on
stderr, exit status 2, no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

__all__ = [
    "POST_RUN_CONFIG_HELP",
    "add_address",
    "address_overrides",
    "command_parser",
    "setup_logging",
    "usage_error",
]

POST_RUN_CONFIG_HELP = (
    "experiment YAML (default: the config of the run that trained the model; a config that "
    "would give the model other data, e.g. another image size, is refused)"
)


def command_parser(
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


def add_address(parser: argparse.ArgumentParser, help: str) -> None:
    """``--address``: the Ray cluster to join (the command's override of ``ray.address``)."""
    parser.add_argument("--address", metavar="ADDR", default=None, help=help)


def address_overrides(args: argparse.Namespace) -> list[str]:
    """The ``--set`` an ``--address`` stands for (none without one)."""
    return [f"ray.address={args.address}"] if args.address else []


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s kdray %(message)s", datefmt="%H:%M:%S"
    )


def usage_error(message: object) -> int:
    """Print ``error: <message>`` on stderr; the exit status of a bad input (2)."""
    print(f"error: {message}", file=sys.stderr)
    return 2

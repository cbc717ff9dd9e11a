"""``kdray <command>``: one front door for the commands (``python -m kdray`` does the same).

    kdray run      train, search and register (tune/run.py)
    kdray report   rebuild a finished run's reports (tune/report.py)
    kdray audit    audit a dataset with the registered champion (tune/audit.py)
    kdray export   export a registered student to ONNX (tune/export.py)
    kdray serve    serve the registered champions over HTTP (make serve)

Each command's module is imported only when it is chosen, so ``kdray --help`` answers at once.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["COMMANDS", "main"]

# command -> (module, function, one line); each function takes (argv, prog) and returns the
# exit status.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "run": ("kdray.cli", "main", "train the teachers, search KD students, register champions"),
    "report": ("kdray.cli", "report_main", "rebuild the reports of the finished runs"),
    "audit": ("kdray.audit.cli", "audit_main", "audit a dataset with the registered champion"),
    "export": ("kdray.edge.cli", "export_main", "export a registered student to ONNX"),
    "serve": ("kdray.serving.run", "main", "serve the registered champions over HTTP"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {about}" for name, (_, _, about) in COMMANDS.items()]
    return (
        "usage: kdray <command> [options]   (kdray <command> --help for its options)\n\n"
        "commands:\n" + "\n".join(lines)
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module, function, _ = COMMANDS[name]
    command = getattr(importlib.import_module(module), function)
    return command(rest, prog=f"kdray {name}")


if __name__ == "__main__":
    sys.exit(main())

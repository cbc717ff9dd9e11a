"""The house's rules, checked on the source: no import circle, nothing private imported from
another module, modules of one job (about 500 lines at most, or a reason at the top), and one
front door (``kdray <command>``) that reaches every command."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from kdray.__main__ import COMMANDS, main

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "kdray"
MAX_LINES = 520  # "about 500"; a longer module says why at its top (LONG_REASON)
LONG_REASON = "Why one module:"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _runtime_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, lazy ones in functions included, but not those under
    ``if TYPE_CHECKING:`` (annotations only: no import happens)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _import_graph() -> tuple[dict[str, set[str]], dict[str, list[str]]]:
    """Module -> the kdray modules it imports; module -> private names it takes from others."""
    modules = _modules()

    def owner(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    edges: dict[str, set[str]] = {name: set() for name in modules}
    private: dict[str, list[str]] = {}
    for name, path in modules.items():
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [owner(a.name) for a in node.names if a.name.startswith("kdray")]
            elif node.level == 0 and (node.module or "").startswith("kdray"):
                targets = []
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    targets.append(full if full in modules else owner(node.module))
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        private.setdefault(name, []).append(f"{node.module}.{alias.name}")
            else:
                continue
            edges[name].update(t for t in targets if t and t != name)
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_circle() -> None:
    edges, _ = _import_graph()
    assert _cycles(edges) == []


def test_cycle_finder_finds_a_circle() -> None:
    """The check above can fail: a lazy import back is a circle too."""
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"]]


def test_nothing_private_imported_from_another_module() -> None:
    _, private = _import_graph()
    assert private == {}


def test_commands_do_not_reach_into_the_pipeline_or_each_other() -> None:
    """The post-run commands share kdray.command and kdray.session, not the run's modules."""
    edges, _ = _import_graph()
    for command in ("kdray.audit.cli", "kdray.edge.cli"):
        assert not edges[command] & {"kdray.cli", "kdray.pipeline"}, command


def test_modules_of_one_job() -> None:
    long = {
        str(path.relative_to(REPO)): n
        for path in PACKAGE.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_LINES
        and LONG_REASON not in (ast.get_docstring(ast.parse(path.read_text())) or "")
    }
    assert long == {}


def test_front_door_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    listed = capsys.readouterr().out
    assert all(f"  {name} " in listed for name in COMMANDS)
    assert main([]) == 2
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_front_door_reaches_each_command(name: str) -> None:
    """``python -m kdray <command> --help``: the command's own parser, named for the door."""
    done = subprocess.run(
        [sys.executable, "-m", "kdray", name, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: kdray {name} ")


def test_front_door_reports_a_bad_config_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kdray", "report", "--config", str(tmp_path / "missing.yaml")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: cannot read config")
    assert "Traceback" not in done.stderr


# What each kind of Ray process imports at start. Every Tune trial, Ray Train worker and Serve
# replica is a fresh process, so each second of import is paid tens of times a run (and in the
# suite): pytorch-grad-cam (with scikit-learn, about 1.6 s) only where a Grad-CAM is computed,
# torchvision (about 1.4 s, torch._dynamo through torchvision.ops) only where a DenseNet, an
# augmentation or a blur is built.
NOT_AT_START = {
    "kdray.trial": ("pytorch_grad_cam", "sklearn", "torchvision", "matplotlib"),
    "kdray.teacher": ("pytorch_grad_cam", "sklearn", "matplotlib"),
}


@pytest.mark.parametrize("module", sorted(NOT_AT_START))
def test_a_ray_processs_module_leaves_heavy_imports_to_where_they_run(module: str) -> None:
    heavy = NOT_AT_START[module]
    code = f"import sys, {module}; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.split() == [], f"importing {module} imports {out.stdout.split()}"

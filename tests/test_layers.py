"""The layers: which package may import which, no import cycles, and one import name installed."""

from __future__ import annotations

import ast
import shutil
import statistics
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("config", "core", "producer", "worker", "cli")
# Imports go one way, toward config/; cli/ is the composition root and may import everything.
ALLOWED = {
    "config": {"config"},
    "core": {"config", "core"},
    "producer": {"config", "core", "producer"},
    "worker": {"config", "core", "worker"},
    "cli": set(PACKAGES),
}


def imports_of(path: Path) -> list[str]:
    """Every module `path` imports, at any depth of the file (function-level imports too)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def modules() -> dict[str, Path]:
    return {
        f"pipeq.{package}.{path.stem}": path
        for package in PACKAGES
        for path in sorted((ROOT / package).glob("*.py"))
    }


def test_every_import_points_down_the_layers() -> None:
    wrong = []
    for name, path in modules().items():
        package = name.split(".")[1]
        for imported in imports_of(path):
            head = imported.split(".")[0]
            if head in PACKAGES:
                wrong.append(f"{path.relative_to(ROOT)} imports {imported} (not under pipeq.)")
            elif head == "pipeq" and imported.split(".")[1] not in ALLOWED[package]:
                wrong.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert wrong == []


def test_no_import_cycles() -> None:
    known = modules()
    graph = {
        name: {imported for imported in imports_of(path) if imported in known} - {name}
        for name, path in known.items()
    }
    cycles = []
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for imported in sorted(graph[name]):
            if state.get(imported) == "open":
                cycles.append(" -> ".join([*trail[trail.index(imported) :], imported]))
            elif imported not in state:
                visit(imported, [*trail, imported])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_module_and_function_sizes() -> None:
    """Small modules with one job each: none over 400 lines, the median at or under 120, and no
    function over 60 lines."""
    lines = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    sizes = [count for name, count in lines.items() if not name.endswith(".__init__")]
    assert max(lines.values()) <= 400, max(lines.items(), key=lambda item: item[1])
    assert statistics.median(sizes) <= 120
    long = [
        f"{name}.{node.name}: {node.end_lineno - node.lineno + 1}"
        for name, path in modules().items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and (node.end_lineno or 0) - node.lineno + 1 > 60
    ]
    assert long == []


@pytest.mark.timeout(600)
def test_wheel_installs_one_import_name_beside_a_config_package(tmp_path: Path) -> None:
    """A web backend with its own `config` package (cookiecutter-django has one) and pipeq
    installed from its wheel: both import, neither shadows the other."""
    # Built from a copy: setuptools' build/ in the checkout would keep modules since removed.
    source = tmp_path / "source"
    for package in PACKAGES:
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        + ["-w", str(tmp_path / "dist"), str(source)],
        check=True,
    )
    [wheel] = (tmp_path / "dist").glob("pipeq-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps"]
        + ["--no-index", str(wheel)],
        check=True,
    )
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # pipeq's dependencies from this environment; a plain path line, so that this
    # environment's editable pipeq (a .pth hook) stays out.
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    backend = tmp_path / "backend"
    (backend / "config").mkdir(parents=True)
    (backend / "config" / "__init__.py").write_text("OWNER = 'the backend'\n")
    probe = (
        "import config, pipeq.config.settings, pipeq.producer.client, pipeq.core.jobs\n"
        "print(config.OWNER)\n"
        "print(pipeq.config.settings.__file__)\n"
        "import importlib.util\n"
        "print(importlib.util.find_spec('worker'), importlib.util.find_spec('producer'))\n"
    )
    out = subprocess.run(
        [python, "-c", probe], cwd=backend, check=True, capture_output=True, text=True
    ).stdout.splitlines()
    assert out[0] == "the backend"
    assert out[1].startswith(site)
    assert out[2] == "None None"

"""Packaging and layering: the wheel installs one name, imports go downward only, and only
the settings read the environment.

The worker-from-a-wheel run (a fresh venv outside the repository, `dropvault demo`, a real
server, worker and deployment run) is `.ci/wheel-worker`, which `.ci/run` calls.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("flows", "tasks", "storage")  # top to bottom
# What each layer may import from the project.
ALLOWED = {
    "flows": {"dropvault.flows", "dropvault.tasks", "dropvault.storage"},
    "tasks": {"dropvault.tasks", "dropvault.storage"},
    "storage": {"dropvault.storage"},
}


def _imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
        elif isinstance(node, ast.ImportFrom) and node.level:
            names.append("<relative>")
    return names


def _sources() -> list[tuple[str, Path]]:
    return [(layer, p) for layer in LAYERS for p in sorted((ROOT / layer).rglob("*.py"))]


def test_imports_go_downward_and_only_under_the_package_name() -> None:
    wrong = []
    for layer, path in _sources():
        for name in _imports(path):
            top = name.split(".")[0]
            if name == "<relative>" or top in LAYERS:
                wrong.append(f"{path.relative_to(ROOT)}: {name} (use dropvault.<layer>)")
            elif top == "dropvault" and not any(
                name == allowed or name.startswith(allowed + ".") for allowed in ALLOWED[layer]
            ):
                wrong.append(f"{path.relative_to(ROOT)}: {name} (imports upward)")
    assert wrong == []


def test_only_the_settings_read_the_environment() -> None:
    readers = []
    for _layer, path in _sources():
        if path == ROOT / "flows" / "settings.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ("environ", "getenv")
                and isinstance(node.value, ast.Name)
                and node.value.id == "os"
            ):
                readers.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert readers == []


def test_the_installed_modules_come_from_one_name() -> None:
    """Running the code imports nothing under the bare folder names: two copies of one module
    (``storage.catalog`` and ``dropvault.storage.catalog``) would split its locks."""
    code = (
        "import sys, dropvault.flows.cli, dropvault.flows.demo, dropvault.flows.deletion;"
        "import dropvault.flows.sharing, dropvault.flows.beacons;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('flows','tasks','storage'));"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


@pytest.mark.integration
def test_the_wheel_installs_only_dropvault(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("dropvault-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"dropvault"}
    assert "dropvault/storage/schema/001_ingest.sql" in names
    assert "dropvault/flows/cli.py" in names and "dropvault/tasks/dicom/walk.py" in names
    assert not [n for n in names if "/tests/" in n or n.endswith((".ipynb", "conftest.py"))]
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "dropvault = dropvault.flows.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_version_names_prefect_and_duckdb() -> None:
    exe = Path(sys.executable).with_name("dropvault")
    # Even with a wrong setting in the environment, --version answers.
    env = {"PATH": "/usr/bin:/bin", "DROPVAULT_HOME": ""}
    proc = subprocess.run(
        [str(exe), "--version"], capture_output=True, text=True, check=False, env=env
    )
    assert proc.returncode == 0, proc.stderr
    from importlib.metadata import version

    assert proc.stdout.strip() == (
        f"dropvault {version('dropvault')} (prefect {version('prefect')},"
        f" duckdb {version('duckdb')})"
    )
    helped = subprocess.run(
        [str(exe), "--help"], capture_output=True, text=True, check=False, env=env
    )
    assert helped.returncode == 0 and "demo" in helped.stdout
    wrong = subprocess.run([str(exe), "status"], capture_output=True, text=True, env=env)
    assert wrong.returncode == 1 and "DROPVAULT_HOME" in wrong.stderr

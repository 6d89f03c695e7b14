"""Every notebook runs top to bottom in a real Jupyter kernel against a demo home."""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from dropvault.flows.demo import run_demo
from dropvault.flows.settings import Settings, SettingsError, notebook_home
from tests.conftest import lake_factory
from tests.helpers import lake_env
from tests.postgres import PostgresServer

pytestmark = pytest.mark.integration

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("nb") / ".dropvault"
    run_demo(Settings.load(home=home))
    return home


def execute(path: Path, cwd: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    ).execute()
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    return nb


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path: Path, demo_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DROPVAULT_HOME", str(demo_home))
    nb = execute(path, demo_home.parent)
    # A chart must show inline (a notebook that forces the Agg backend shows none).
    plots = sum(".plot(" in c.source for c in nb.cells if c.cell_type == "code")
    charts = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(charts) >= plots, f"{plots} plotting cells, {len(charts)} charts shown"


def test_demo_and_explore_notebook_on_ducklake(
    tmp_path: Path,
    postgres: PostgresServer,
    moto_endpoint: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same demo (every flow) and the same notebook, unchanged, on a DuckLake catalog."""
    lake = lake_factory(postgres, moto_endpoint)()
    for name, value in lake_env(lake).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DROPVAULT_HOME", str(tmp_path / ".dropvault"))
    settings = Settings.load()
    run_demo(settings)
    catalog = settings.build_home().catalog
    assert catalog.backend == "ducklake"
    n = catalog.query("SELECT count(*) AS n FROM instances")["n"][0]
    assert n > 0 and not (tmp_path / ".dropvault" / "catalog.duckdb").exists()
    execute(NOTEBOOKS[0], tmp_path)


def test_there_are_notebooks() -> None:
    assert NOTEBOOKS


def test_a_notebook_finds_the_projects_home_not_its_own_folders(
    demo_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With DROPVAULT_HOME unset, a notebook opened from ``notebooks/`` uses the project's
    ``.dropvault``; with no home made there, one clear error and nothing created."""
    monkeypatch.delenv("DROPVAULT_HOME", raising=False)
    project = tmp_path / "project"
    (project / "notebooks").mkdir(parents=True)
    (project / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    shutil.copytree(demo_home, project / ".dropvault", ignore=shutil.ignore_patterns("prefect"))
    nb = execute(NOTEBOOKS[0], project / "notebooks")
    assert any("instances" in str(o) for c in nb.cells for o in c.get("outputs", []))
    assert not (project / "notebooks" / ".dropvault").exists()

    empty = tmp_path / "empty"
    (empty / "notebooks").mkdir(parents=True)
    (empty / "pyproject.toml").write_text("[project]\nname = 'y'\n")
    with pytest.raises(SettingsError, match="no dropvault home at .*dropvault demo"):
        notebook_home(empty / "notebooks")
    assert sorted(p.name for p in empty.iterdir()) == ["notebooks", "pyproject.toml"]

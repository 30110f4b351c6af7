"""The import layers of pyproject.toml's [tool.importlinter], checked by the real `lint-imports`
on this package, and on copies of it with one import added where the layering forbids it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from helpers import REPO

PACKAGE = REPO / "src" / "transfer_learning"
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def lint_imports(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(pythonpath)) if pythonpath else dict(os.environ)
    return subprocess.run(
        [str(LINT_IMPORTS), str(REPO / "pyproject.toml"), "--no-cache"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_the_package_keeps_its_layers_and_has_no_circles():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_every_layer_is_a_module_of_the_package():
    """The contract lists what exists (``exhaustive``: and everything that exists is listed)."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    (layers,) = [c for c in config["contracts"] if c["type"] == "layers"]
    assert layers["exhaustive"] is True
    names = [n.strip() for layer in layers["layers"] for n in layer.replace("|", ":").split(":")]
    on_disk = {p.stem for p in PACKAGE.glob("*.py")} | {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert sorted(names) == sorted(on_disk - {"__init__"})


def with_import(tmp_path: Path, file: str, code: str) -> Path:
    """A copy of the package with ``code`` appended to ``file``; the folder to put on PYTHONPATH."""
    root = tmp_path / "src"
    shutil.copytree(PACKAGE, root / "transfer_learning", ignore=shutil.ignore_patterns("__pycache__"))
    target = root / "transfer_learning" / file
    target.write_text((target.read_text() if target.exists() else "") + "\n" + code + "\n")
    return root


# (file, the import added, a contract it breaks, words of the report naming the import, how many
# of the two contracts break: an upward import also closes a circle with the imports it reverses)
BREAKS = [
    pytest.param(
        "data/images.py",
        "from transfer_learning.run import config",
        "cli > serve",
        "transfer_learning.data.images -> transfer_learning.run.config",
        2,
        id="data-imports-run",
    ),
    pytest.param(
        "model/network.py",
        "def _peer():\n    from transfer_learning.data import images",
        "cli > serve",
        "transfer_learning.model.network -> transfer_learning.data.images",
        1,
        id="model-imports-data-inside-a-function",
    ),
    pytest.param(
        "errors.py",
        "from transfer_learning import readers",
        "cli > serve",
        "transfer_learning.errors -> transfer_learning.readers",
        2,
        id="errors-imports-a-basic",
    ),
    pytest.param(
        "results/evaluate.py",
        "from transfer_learning.cli import predict",
        "cli > serve",
        "transfer_learning.results.evaluate -> transfer_learning.cli.predict",
        2,
        id="results-imports-cli",
    ),
    pytest.param(
        "results/report.py",
        "def _back():\n    from transfer_learning.results import finish",
        "no circles",
        ".report -> .finish",
        1,
        id="a-circle-inside-results",
    ),
    pytest.param(
        "newthing.py", "", "cli > serve", "transfer_learning.newthing", 1, id="a-module-in-no-layer"
    ),
]


@pytest.mark.parametrize(("file", "code", "contract", "named", "broken"), BREAKS)
def test_a_forbidden_import_breaks_lint_imports(tmp_path, file, code, contract, named, broken):
    root = with_import(tmp_path, file, code)
    result = lint_imports(tmp_path, pythonpath=root)
    assert result.returncode == 1, result.stdout + result.stderr
    report = result.stdout.split("Broken contracts", 1)[-1]
    assert contract in report and named in report, result.stdout
    assert f"{2 - broken} kept, {broken} broken" in result.stdout

"""The architecture's rules (``[tool.importlinter]`` in pyproject.toml), checked by import-linter: the
tree keeps every contract, and a change that breaks one fails, naming the import that breaks it."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("fl_sim", "strategies", "attacks", "defenses")


def lint_imports(cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert exe, "lint-imports is not installed (pip install -e '.[test]')"
    env = dict(os.environ)
    if pythonpath is not None:  # analyse the copy in `pythonpath`, not the installed packages
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([exe, "--no-cache", "--no-logo"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_tree_keeps_every_architecture_contract():
    p = lint_imports(REPO)
    assert p.returncode == 0, p.stdout + p.stderr
    kept = re.search(r"Contracts: (\d+) kept, (\d+) broken", p.stdout)
    assert kept and int(kept.group(1)) >= 6 and kept.group(2) == "0", p.stdout


@pytest.mark.parametrize("module, line, chain", [
    ("attacks/dlg.py", "import flwr", "attacks.dlg -> flwr"),  # attacks are pure PyTorch
    ("attacks/base.py", "import fl_sim.metrics", "attacks.base -> fl_sim.metrics"),
    ("defenses/mods.py", "import attacks.base", "defenses.mods -> attacks.base"),  # defenses know no attack
    ("strategies/guard.py", "import fl_sim._quiet", "strategies.guard -> fl_sim._quiet"),  # strategies know no fl_sim
    ("fl_sim/workspace.py", "import fl_sim.runner", "fl_sim.workspace -> fl_sim.runner"),  # a layer imports upwards
    ("fl_sim/client.py", "import fl_sim.server", "fl_sim.client -> fl_sim.server"),  # the two sides are independent
    ("fl_sim/split/cut.py", "import fl_sim.split.server", "fl_sim.split.cut -> fl_sim.split.server"),
])
def test_a_broken_rule_fails_naming_the_import(tmp_path, module, line, chain):
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{line}  # breaks a rule on purpose\n")
    p = lint_imports(tmp_path, pythonpath=tmp_path)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "BROKEN" in p.stdout and re.search(rf"{re.escape(chain)} \(l\.\d+\)", p.stdout), p.stdout


def test_every_core_module_has_its_place_in_the_layers(tmp_path):
    """The layers contract is exhaustive: a new module of fl_sim that no layer names fails the check."""
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "fl_sim" / "misc.py").write_text('"""A module no layer names."""\n')
    p = lint_imports(tmp_path, pythonpath=tmp_path)
    assert p.returncode == 1 and "fl_sim.misc" in p.stdout, p.stdout

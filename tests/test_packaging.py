"""The installed form: one package, rl_insides, laid out as the checkout is (pyproject.toml,
rl_insides/__init__.py), whose code keeps importing itself by its checkout names."""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPED = ("modules", "callbacks", "datamodules", "configs")  # rl_insides.<name> is the checkout's <name>/


def setuptools_config() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def checkout_folders() -> dict[str, Path]:
    """Package name -> folder, for every folder of the mapped trees (code or data files)."""
    folders = {}
    for top in MAPPED:
        for folder in [ROOT / top, *sorted(p for p in (ROOT / top).rglob("*") if p.is_dir())]:
            if "__pycache__" not in folder.parts:
                folders[".".join(("rl_insides", *folder.relative_to(ROOT).parts))] = folder
    return folders


def test_every_folder_and_data_file_is_packaged():
    config = setuptools_config()
    assert config["package-dir"] == {"rl_insides": "rl_insides", **{f"rl_insides.{t}": t for t in MAPPED}}
    folders = checkout_folders()
    missing = sorted(set(folders) - set(config["packages"]))
    assert not missing, f"pyproject.toml [tool.setuptools] packages lacks {missing}"
    assert set(config["packages"]) == {"rl_insides", *folders}, "pyproject.toml lists packages that do not exist"
    unshipped = []
    for package, folder in folders.items():
        patterns = config.get("package-data", {}).get(package, [])
        for path in folder.iterdir():
            if path.is_file() and path.suffix not in (".py", ".pyc") \
                    and not any(fnmatch.fnmatch(path.name, p) for p in patterns):
                unshipped.append(str(path.relative_to(ROOT)))
    assert not unshipped, f"pyproject.toml [tool.setuptools.package-data] does not ship {unshipped}"


def test_cli_is_linked_into_the_package():
    link = ROOT / "rl_insides" / "cli.py"
    assert link.is_symlink() and link.resolve() == ROOT / "cli.py", \
        "rl_insides/cli.py must be a link to ../cli.py (a checkout without links cannot build the package)"


def run_python(code: str, cwd: Path, pythonpath: Path | None = None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath)
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_checkout_names_under_rl_insides(tmp_path):
    """In the checkout, rl_insides.X is the checkout's X; nothing else is redirected."""
    out = run_python(
        "import sys, rl_insides, modules.errors, rl_insides.modules.errors as alias, cli, rl_insides.cli\n"
        "assert alias is modules.errors and rl_insides.cli is cli, 'two copies'\n"
        "assert modules.errors.__spec__.name == 'modules.errors'\n"
        "assert not sys.meta_path[0].installed\n"
        "print(cli.__file__)", cwd=ROOT)
    assert Path(out.strip()) == ROOT / "cli.py"


def test_wheel_is_one_package_that_imports_itself(tmp_path):
    """A wheel built from the checkout holds rl_insides only; installed (here: unpacked, run from
    elsewhere), its modules import each other by their checkout names, and its data files are found."""
    pytest.importorskip("setuptools")
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "requirements.txt", "cli.py"):
        shutil.copy2(ROOT / name, source / name)
    for name in ("rl_insides", *MAPPED):
        shutil.copytree(ROOT / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(tmp_path / "wheel"), str(source)], check=True, capture_output=True, timeout=600)
    [wheel] = (tmp_path / "wheel").glob("rl_insides-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(tmp_path / "site")
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"rl_insides"}
    assert "rl_insides/configs/steering_rl_smollm2.yaml" in names
    assert (tmp_path / "site" / "rl_insides" / "cli.py").read_text() == (ROOT / "cli.py").read_text()

    site = tmp_path / "site"
    out = run_python(
        "import rl_insides\n"
        "from rl_insides.callbacks.checkpoints import EvenlySpacedCheckpoint\n"
        "import callbacks.checkpoints, modules.errors, rl_insides.modules.errors, cli\n"
        "from datamodules.prompts import DEFAULT_TRAIN, resolve_path\n"
        "assert EvenlySpacedCheckpoint is callbacks.checkpoints.EvenlySpacedCheckpoint\n"
        "assert rl_insides.modules.errors is modules.errors\n"
        "assert EvenlySpacedCheckpoint.__module__ == 'callbacks.checkpoints'\n"
        "for m in (modules.errors, callbacks.checkpoints, cli): print(m.__file__)\n"
        "print(resolve_path(DEFAULT_TRAIN))", cwd=tmp_path, pythonpath=site)
    for line in out.split():
        assert Path(line).is_file() and Path(line).is_relative_to(site / "rl_insides"), out

"""What `pip install .` delivers: the presets from the top-level `presets/` folder and every module."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sapo_lite.config.sources import preset_names

ROOT = Path(__file__).resolve().parent.parent
LIST_AND_LOAD = """
import sapo_lite
from sapo_lite.config.sources import load_config, preset_names
names = preset_names()
for name in names:
    load_config(name)
print(sapo_lite.__file__)
print(",".join(names))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the source tree (the build never writes into the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("sapo_lite", "presets"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(tmp / "dist")],
        check=True, capture_output=True, text=True, timeout=300,
    )
    return next((tmp / "dist").glob("sapo_lite-*.whl"))


def test_presets_are_a_top_level_folder_and_none_is_left_inside_the_package():
    assert sorted(p.stem for p in (ROOT / "presets").glob("*.yaml")) == preset_names()
    assert not list((ROOT / "sapo_lite").rglob("*.yaml")), "move preset files to the top-level presets/ folder"


@pytest.mark.slow
def test_an_installed_wheel_lists_and_loads_every_preset(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    clean = tmp_path / "elsewhere"  # no sapo_lite/ or presets/ in the working directory
    clean.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", LIST_AND_LOAD], cwd=clean, capture_output=True, text=True, timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    module_file, names = proc.stdout.split()
    assert Path(module_file).is_relative_to(site)  # the installed copy, not the source tree
    assert names.split(",") == preset_names()


@pytest.mark.slow
def test_the_wheel_holds_every_module_of_the_source_tree(wheel):
    # pyproject.toml lists the packages by name; a subpackage added without listing it would be left out.
    in_wheel = {name for name in zipfile.ZipFile(wheel).namelist() if name.endswith(".py")}
    in_source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "sapo_lite").rglob("*.py")}
    assert in_source <= in_wheel, f"missing from the wheel: {sorted(in_source - in_wheel)}"


@pytest.mark.slow
def test_the_wheel_holds_the_dashboards_assets(wheel):
    """The dashboard works offline: its chart library, scripts and stylesheet ship inside the package."""
    in_wheel = set(zipfile.ZipFile(wheel).namelist())
    in_source = {p.relative_to(ROOT).as_posix() for p in (ROOT / "sapo_lite" / "ui" / "static").iterdir()}
    assert "sapo_lite/ui/static/uPlot.iife.min.js" in in_source
    assert in_source <= in_wheel, f"missing from the wheel: {sorted(in_source - in_wheel)}"

"""Installable: the configs ship inside the package, a wheel runs from anywhere, and a user's
own config directory extends ours."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.test_cli import SMALL
from zopro_lightning.run.cli import CONFIG_DIR

REPO = Path(__file__).resolve().parent.parent
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def user_config_dir(root: Path) -> Path:
    """A user's Hydra directory: a sampler of their own, and a primary config of their own
    that builds on ours through the search path."""
    (root / "sampler").mkdir(parents=True)
    (root / "sampler" / "my.yaml").write_text(
        "name: my\nsampler:\n  _target_: zopro_lightning.zo.samplers.RademacherSampler\n"
    )
    (root / "my_experiment.yaml").write_text(
        "defaults:\n  - config\n  - override sampler: my\n  - _self_\n\n"
        "hydra:\n  searchpath:\n    - pkg://zopro_lightning.conf\n\n"
        "loop:\n  iterations: 7\n"
    )
    return root


def run(command: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_every_subpackage_ships_with_the_configs():
    listed = set(pyproject()["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(REPO).parts)
        for init in (REPO / "zopro_lightning").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    assert listed == found | {"zopro_lightning.conf"}, "add new subpackages to pyproject.toml"
    assert pyproject()["tool"]["setuptools"]["package-dir"] == {"zopro_lightning.conf": "conf"}


def test_console_scripts():
    scripts = pyproject()["project"]["scripts"]
    assert scripts["zopro-train"] == "zopro_lightning.run.cli:train"
    assert scripts["zopro-generate"] == "zopro_lightning.run.generate:main"


def test_an_editable_install_reads_the_repositorys_conf():
    assert Path(CONFIG_DIR) == REPO / "conf"


@pytest.mark.parametrize(
    "how",
    [
        ["--config-dir", "{user}", "sampler=my"],
        ["hydra.searchpath=[file://{user}]", "sampler=my"],
        ["--config-dir", "{user}", "--config-name", "my_experiment"],
    ],
)
def test_a_users_config_directory_extends_ours(tmp_path, how):
    user = user_config_dir(tmp_path / "my_conf")
    args = [arg.format(user=user) for arg in how]
    result = run([sys.executable, "-m", "zopro_lightning.run.cli", *args, "--cfg", "job"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "zopro_lightning.zo.samplers.RademacherSampler" in result.stdout
    assert "name: my" in result.stdout
    assert "dataset:" in result.stdout and "policy:" in result.stdout  # ours still composed
    if "my_experiment" in args:
        assert "iterations: 7" in result.stdout


@pytest.mark.slow
def test_the_wheel_runs_from_an_empty_directory(tmp_path):
    # build from a copy of what the wheel is made of, so the repository gets no build/
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("zopro_lightning", "conf"):
        shutil.copytree(REPO / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", "dist", str(source)], tmp_path
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("zopro_lightning-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for path in ("config.yaml", "sampler/zopro.yaml", "hydra/help/zopro.yaml", "__init__.py"):
        assert f"zopro_lightning/conf/{path}" in names, path
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "zopro-generate" in zipfile.ZipFile(wheel).read(entry_points).decode()

    site = tmp_path / "site"
    installed = run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], tmp_path)
    assert installed.returncode == 0, installed.stderr[-3000:]
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    python = [sys.executable]

    where = run(
        [*python, "-c", "import zopro_lightning.run.cli as c; print(c.__file__, c.CONFIG_DIR)"],
        empty,
        env,
    )
    assert where.returncode == 0, where.stderr[-3000:]
    module_file, config_dir = where.stdout.split()
    assert (
        Path(module_file).is_relative_to(site)
        and Path(config_dir) == site / "zopro_lightning" / "conf"
    )

    job = run([*python, "-m", "zopro_lightning.run.cli", "--cfg", "job"], empty, env)
    assert job.returncode == 0, job.stderr[-3000:]
    assert "sampler:" in job.stdout and "ZOPrOSampler" in job.stdout

    user = user_config_dir(tmp_path / "my_conf")
    extended = run(
        [
            *python,
            "-m",
            "zopro_lightning.run.cli",
            "--config-dir",
            str(user),
            "sampler=my",
            "--cfg",
            "job",
        ],
        empty,
        env,
    )
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert "RademacherSampler" in extended.stdout

    run_dir = tmp_path / "run"
    trained = run(
        [
            *python,
            "-m",
            "zopro_lightning.run.cli",
            f"hydra.run.dir={run_dir}",
            *SMALL,
            "loop.iterations=1",
        ],
        empty,
        env,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (run_dir / "summary.json").exists() and (run_dir / "policy" / "config.json").exists()
    assert not list(empty.iterdir())  # nothing written into the working directory

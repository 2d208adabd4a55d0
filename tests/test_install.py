"""A non-editable install carries its own defaults: it builds configs, trains and samples.

The package is built from a copy of its sources (so the checkout stays clean) and installed
with pip into a folder of its own, without dependencies (they come from this environment).
The checkout's ``train.py``, ``sample.py`` and ``configs/`` are copied to a directory without
the ``diffusion_jax`` folder, so every import must come from the installed package.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import trainer_helpers as h


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """``(site, scripts)``: the installed package's folder and a folder of the CLIs + configs."""
    root = tmp_path_factory.mktemp("install")
    source, site, scripts = root / "source", root / "site", root / "scripts"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(h.REPO / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(h.REPO / "diffusion_jax", source / "diffusion_jax", ignore=ignore)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index"]
        + ["--no-build-isolation", "--target", str(site), str(source)],
        check=True,
        capture_output=True,
    )
    scripts.mkdir()
    for name in ("train.py", "sample.py"):
        shutil.copy(h.REPO / name, scripts / name)
    shutil.copytree(h.REPO / "configs", scripts / "configs", ignore=ignore)
    return site, scripts


def _run(args, cwd, site, **kwargs):
    env = dict(h.subprocess_env(), PYTHONPATH=str(site))
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, **kwargs
    )


def test_the_installed_package_is_the_one_imported(installed, tmp_path):
    site, _ = installed
    out = _run(["-c", "import diffusion_jax; print(diffusion_jax.__file__)"], tmp_path, site)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(site)), out.stdout
    # The wheel holds every subpackage and no test or config file.
    packages = {p.name for p in (site / "diffusion_jax").iterdir() if p.is_dir()}
    assert {"samplers", "models", "data", "plots", "train", "evaluation"} <= packages


def test_config_helpers_work_from_any_directory(installed, tmp_path):
    site, _ = installed
    code = (
        "from diffusion_jax.train import config\n"
        "c = config.default_config()\n"
        "config.validate_config(c)\n"
        "print(c.data.name, c.diffusion.schedule)\n"
    )
    out = _run(["-c", code], tmp_path, site)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["digits", "cosine"]


def test_the_installed_package_trains_and_samples(installed, tmp_path):
    site, scripts = installed
    workdir = tmp_path / "run"
    overrides = h.flag_overrides(h.TINY_SWISSROLL, **{"train.num_steps": 4, "train.log_every": 2})
    trained = _run(
        ["train.py", "--config", "configs/swissroll.py", f"--workdir={workdir}", *overrides],
        scripts,
        site,
        timeout=600,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (workdir / "checkpoints" / "4").is_dir()
    sampled = _run(
        ["sample.py", f"--workdir={workdir}", "--num=8", "--steps=5", f"--out={tmp_path / 's'}"],
        scripts,
        site,
        timeout=600,
    )
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert (tmp_path / "s" / "samples.npz").is_file()

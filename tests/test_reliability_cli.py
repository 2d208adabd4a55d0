"""Issue 15: each command-line failure is one ``error: ...`` line naming what to fix, exit
status 2, no traceback, and no directory created as a side effect."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest
import trainer_helpers as h
from PIL import Image

from diffusion_jax.data.__main__ import main as data_main
from diffusion_jax.evaluation.__main__ import main as evaluation_main
from diffusion_jax.plots.__main__ import main as plots_main
from diffusion_jax.train.checkpoint import CheckpointManager


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _fake_run(workdir, *, conditional: bool) -> str:
    """A workdir whose one checkpoint holds a config and a dummy state (no model params): a
    request refused from the config alone never reaches the params."""
    config = {"model": {"class_conditional": conditional}, "diffusion": {"num_timesteps": 10}}
    with CheckpointManager(os.path.join(workdir, "checkpoints"), async_save=False) as manager:
        manager.save(1, {"x": jnp.zeros(2)}, config=config)
    return str(workdir)


# --------------------------------------------------------------------------- damaged inputs


def _truncated_png(path):
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _text_as_png(path):
    path.write_text("this is not an image")


@pytest.mark.parametrize("damage", [_truncated_png, _text_as_png], ids=["truncated", "not_image"])
def test_folder_dataset_with_an_unreadable_image(tmp_path, capsys, damage):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    damage(folder / "bad.png")
    status = data_main(["prepare", f"folder:{folder}", "--data_dir", str(tmp_path / "tfds")])
    line = _one_error_line(capsys)
    assert status == 2
    assert str(folder / "bad.png") in line and "cannot read" in line


def _garbage(path):
    path.write_bytes(b"definitely not an npz file")


def _truncated_npz(path):
    np.savez(path, mu=np.zeros(2048), sigma=np.eye(2048))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


def _other_npz(path):
    np.savez(path, something=np.zeros(3))


NPZ_DAMAGE = {"garbage": _garbage, "truncated": _truncated_npz, "other_keys": _other_npz}


@pytest.mark.parametrize("damage", list(NPZ_DAMAGE.values()), ids=list(NPZ_DAMAGE))
@pytest.mark.parametrize("role", ["inception_weights", "reference_statistics"])
def test_damaged_npz_inputs(tmp_path, capsys, damage, role):
    bad = tmp_path / "bad.npz"
    damage(bad)
    if role == "inception_weights":
        argv = ["ref-stats", "--dataset", "digits", "--out", str(tmp_path / "stats.npz")]
        argv += ["--inception_weights", str(bad)]
    else:
        workdir = _fake_run(tmp_path / "run", conditional=False)
        argv = ["fid", "--workdir", workdir, "--ref", str(bad), "--num", "10"]
    status = evaluation_main(argv)
    line = _one_error_line(capsys)
    assert status == 2 and str(bad) in line
    assert not (tmp_path / "stats.npz").exists()


# --------------------------------------------------------------------------- plots of a run


@pytest.mark.parametrize("figure", ["loss", "trajectory", "samples"])
@pytest.mark.parametrize("what", ["missing_workdir", "empty_workdir"])
def test_plots_of_a_run_that_is_not_there(tmp_path, capsys, figure, what):
    workdir = tmp_path / "run"
    if what == "empty_workdir":
        workdir.mkdir()
    status = plots_main([figure, "--workdir", str(workdir), "--out", str(tmp_path / "f.png")])
    line = _one_error_line(capsys)
    assert status == 2
    if what == "missing_workdir":
        assert "No such workdir" in line and not workdir.exists()
    else:
        assert ("metrics.jsonl" if figure == "loss" else "No checkpoint") in line
        assert sorted(os.listdir(workdir)) == []
    assert not (tmp_path / "f.png").exists()


# --------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("command", ["plots", "ref-stats", "convert-inception"])
def test_out_that_cannot_be_written_fails_first(tmp_path, capsys, command):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    out = str(blocker / "sub" / "x.png")
    if command == "plots":
        status = plots_main(["schedules", "--out", out])
    elif command == "ref-stats":
        # Missing weights would fail later: the --out check comes first.
        status = evaluation_main(
            ["ref-stats", "--dataset", "digits", "--out", out, "--inception_weights", "none"]
        )
    else:
        status = evaluation_main(["convert-inception", "--pth", "none.pth", "--out", out])
    line = _one_error_line(capsys)
    assert status == 2
    assert line.startswith(f"error: --out {out}: cannot be created") and str(blocker) in line


def test_evaluation_of_a_mistyped_workdir_creates_nothing(tmp_path, capsys):
    missing = tmp_path / "mistyped"
    stats = tmp_path / "stats.npz"
    np.savez(stats, mu=np.zeros(2048), sigma=np.eye(2048))
    for argv in (
        ["nll", "--workdir", str(missing)],
        ["fid", "--workdir", str(missing), "--ref", str(stats), "--num", "10"],
    ):
        assert evaluation_main(argv) == 2
        assert "No such workdir" in _one_error_line(capsys)
        assert not missing.exists()


# --------------------------------------------------------------------------- sample.py


def _sample_py(*flags):
    return h.run([h.sys.executable, str(h.REPO / "sample.py"), *flags])


def test_sample_py_failures(tmp_path):
    """One subprocess per failure class: each is one error line and exit status 2."""
    unconditional = _fake_run(tmp_path / "run", conditional=False)
    conditional = _fake_run(tmp_path / "conditional", conditional=True)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cases = {
        # Refused from the saved config, before the (here absent) params are restored.
        "guidance": (
            [f"--workdir={unconditional}", "--guidance=3"],
            "error: --guidance needs a class-conditional model",
        ),
        "guidance_without_labels": (
            [f"--workdir={conditional}", "--guidance=3"],
            "error: --guidance needs labels",
        ),
        "steps": (
            [f"--workdir={unconditional}", "--steps=11"],
            "error: --steps must lie in [1, 10]",
        ),
        "out": (
            [f"--workdir={unconditional}", f"--out={blocker}/samples"],
            f"{blocker}/samples: cannot be created",
        ),
        "workdir": ([f"--workdir={tmp_path}/mistyped"], "No such workdir"),
    }
    for name, (flags, expected) in cases.items():
        result = _sample_py(*flags)
        assert result.returncode == 2, (name, result.stderr[-2000:])
        assert "Traceback" not in result.stderr, (name, result.stderr[-2000:])
        errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and expected in errors[0], (name, result.stderr[-2000:])
    assert not (tmp_path / "mistyped").exists()
    assert not os.path.exists(os.path.join(unconditional, "generated"))

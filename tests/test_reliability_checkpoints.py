"""Issue 15: an edited or damaged JSON item (data position, config) of the newest checkpoint
makes the trainer's resume and sample.py's restore fall back to the previous checkpoint with
a warning, instead of resuming from the wrong data or refusing to start."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import trainer_helpers as h

from diffusion_jax import train
from diffusion_jax.evaluation import runs, sampling

pytestmark = pytest.mark.filterwarnings(
    "ignore:(?s).*Event loop is closed:pytest.PytestUnraisableExceptionWarning"
)

EDITS = {
    "data_state_values": ("data_state", lambda item: {**item, "value": {"edited": 1}}),
    "data_state_structure": ("data_state", lambda item: ["not", "a", "position"]),
    "config_values": (
        "config",
        lambda item: {**item, "value": {**item["value"], "seed": 12345}},
    ),
    "config_structure": ("config", lambda item: {"value": [1, 2], "sha256": item["sha256"]}),
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A swiss-roll run with checkpoints at steps 10 and 20."""
    workdir = tmp_path_factory.mktemp("reliability_ckpt") / "run"
    config = h.swissroll(train__num_steps=20, train__checkpoint_every=10, train__eval_every=0)
    train.train_and_evaluate(config, str(workdir))
    return workdir, config


def _edited_copy(trained, tmp_path, edit):
    source, config = trained
    workdir = tmp_path / "run"
    shutil.copytree(source, workdir)
    name, change = edit
    path = workdir / "checkpoints" / "20" / name / "metadata"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    return workdir, config


@pytest.mark.parametrize("edit", list(EDITS.values()), ids=list(EDITS))
def test_trainer_resume_falls_back_past_an_edited_item(trained, tmp_path, caplog, edit):
    workdir, config = _edited_copy(trained, tmp_path, edit)
    with caplog.at_level(logging.WARNING):
        train.train_and_evaluate(config, str(workdir))
    newest = os.path.join(workdir, "checkpoints", "20")
    assert newest in caplog.text and "using step 10" in caplog.text
    assert (workdir / "checkpoints" / "corrupt" / "20").is_dir()
    assert (workdir / "checkpoints" / "20").is_dir()  # steps 11..20 were trained again


@pytest.mark.parametrize("edit", list(EDITS.values()), ids=list(EDITS))
def test_sampling_restore_falls_back_past_an_edited_item(trained, tmp_path, caplog, edit):
    workdir, _ = _edited_copy(trained, tmp_path, edit)
    with caplog.at_level(logging.WARNING):
        run = runs.restore_run(str(workdir))
    assert run.step == 10
    assert os.path.join(workdir, "checkpoints", "20") in caplog.text
    assert not (workdir / "checkpoints" / "corrupt").exists()  # a reader moves nothing


def test_sample_from_workdir_falls_back_past_an_unreadable_config(trained, tmp_path, caplog):
    workdir, _ = _edited_copy(trained, tmp_path, EDITS["config_structure"])
    with caplog.at_level(logging.WARNING):
        written = sampling.sample_from_workdir(
            str(workdir), out=str(tmp_path / "out"), num=4, steps=2, progress=False
        )
    assert os.path.isfile(written["npz"])
    # One warning: the config check before the restore does not repeat the restore's.
    warnings = [r for r in caplog.records if r.name == "diffusion_jax.train.checkpoint"]
    assert len(warnings) == 1
    assert os.path.join(workdir, "checkpoints", "20") in warnings[0].getMessage()

"""The quality-per-minute harness (benchmarks/quality_per_minute.py) and ``train.max_seconds``.

Cheap by design: the recipes are only built and validated, the time budget stops the tiny
swiss-roll run under a fake clock (no timing in the test), and the table's aggregation runs
on made-up rows.
"""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import trainer_helpers as h

from benchmarks import quality_per_minute as qpm
from benchmarks import quality_recipes, quality_table
from diffusion_jax import train
from diffusion_jax.train import config as config_lib
from diffusion_jax.train import loop


@pytest.mark.parametrize("name", sorted(quality_recipes.RECIPES))
def test_every_recipe_is_a_valid_config_with_its_overrides(name):
    config = qpm.recipe_config(name, seed=1, num_steps=1234, max_seconds=300)
    _, overrides, samplers = quality_recipes.RECIPES[name]
    for dotted, value in overrides.items():
        section, field = dotted.split(".")
        assert config[section][field] == value, dotted
    assert (config.seed, config.train.num_steps, config.train.max_seconds) == (1, 1234, 300.0)
    assert config.train.num_samples == 0 and config.train.eval_every == 0
    assert (
        quality_recipes.DEMO_SAMPLER in samplers
    )  # every recipe is scored with the demo's sampler


def test_unknown_recipe_and_unknown_field_are_refused():
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        qpm.recipe_config("nope")
    with pytest.raises(KeyError, match=r"optim\.lrr"):
        qpm.apply_overrides(qpm.recipe_config("default"), {"optim.lrr": 1.0})


@pytest.mark.parametrize("value", [-1.0, float("inf")])
def test_max_seconds_must_be_a_finite_number_at_least_zero(value):
    config = h.swissroll(train__max_seconds=value)
    with pytest.raises(ValueError, match=r"train\.max_seconds"):
        config_lib.validate_config(config)


def test_time_budget_saves_a_checkpoint_and_ends_the_run(monkeypatch, tmp_path):
    """A fake clock advancing 1 s per reading: the budget starts after step 1 and 3.5 s are
    spent at step 4 (readings 1 s, 2 s, 3 s, 4 s after steps 1-4); the run saves step 4, logs
    it, writes its grid and returns normally. Running again resumes and spends a new budget."""
    ticks = iter(range(1, 10_000))
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(monotonic=lambda: next(ticks)))
    config = h.swissroll(
        train__max_seconds=3.5, train__checkpoint_every=0, train__eval_every=0, train__log_every=50
    )
    workdir = tmp_path / "run"
    state = train.train_and_evaluate(config, str(workdir))
    assert int(state.step) == 4 < config.train.num_steps
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["4"]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [4]
    assert any("4" in p.name for p in (workdir / "samples").iterdir())

    ticks = iter(range(1, 10_000))
    config.train.num_samples = 0  # the grid is tested above; a run field, free to change
    state = train.train_and_evaluate(config, str(workdir))
    assert int(state.step) == 8


def _row(recipe, seed, **figures):
    return {"recipe": recipe, "sampler": "ddim:50", "minutes": 5, "num_samples": 500,
            "seed": seed, **figures}  # fmt: skip


def test_aggregation_gives_mean_and_seed_range_per_group():
    rows = [
        _row("a", 0, steps=100, recognisable=0.5, frechet_pca=1.0, classes=10),
        _row("b", 0, steps=50, recognisable=0.9, frechet_pca=0.2, classes=9),
        _row("a", 1, steps=110, recognisable=0.7, frechet_pca=1.6, classes=10),
        _row("a", 2, steps=90, recognisable=0.6, frechet_pca=1.3, classes=8),
        {**_row("a", 0, steps=10, recognisable=0.1, frechet_pca=9.0), "minutes": 0.5},
    ]
    a, b, a_short = quality_table.aggregate(rows)
    assert (a["recipe"], a["minutes"], a["seeds"]) == ("a", 5, [0, 1, 2])
    assert a["steps"] == pytest.approx((100.0, 20.0))
    assert a["recognisable"] == pytest.approx((0.6, 0.2))
    assert a["frechet_pca"] == pytest.approx((1.3, 0.6))
    assert a["classes"] == pytest.approx((28 / 3, 2.0))
    assert a["steps_per_s"] is None  # no row has it
    assert b["seeds"] == [0] and b["frechet_pca"] == pytest.approx((0.2, 0.0))
    assert a_short["minutes"] == 0.5 and a_short["steps"] == pytest.approx((10.0, 0.0))


def test_table_prints_each_group_and_the_ceiling(monkeypatch):
    ceiling = {
        "recognisable": 0.86,
        "classes": 10,
        "frechet_pca": (0.05, 0.01),
        "frechet_pca_1500": None,
    }
    monkeypatch.setattr(quality_table, "ceiling", lambda num, seeds: ceiling)
    rows = [
        _row("a", 0, steps=100, recognisable=0.5, frechet_pca=1.0, classes=10, load_before=1.0),
        _row("a", 1, steps=110, recognisable=0.7, frechet_pca=1.6, classes=10, load_before=2.5),
    ]
    lines = quality_table.table(rows).splitlines()[2:]  # after the legend
    assert len(lines) == 4
    assert lines[2].startswith("| a | ddim:50 | 500 | 5 | 2 | 105 (10) |")
    assert "| 0.60 (0.20) |" in lines[2] and "| 1.300 (0.600) | - |" in lines[2]
    assert lines[2].endswith("| 2.5 |")  # the highest load of the group
    assert "real digits" in lines[3] and "| 0.86 |" in lines[3] and "0.050 (0.010)" in lines[3]


def test_large_samples_are_also_scored_on_their_first_1500_against_all_real_digits():
    """Above 1,500 samples the Frechet distance is also taken on the first 1,500, the size at
    which the real digits' floor (all train digits) exists; the ceiling then gives only that."""
    from diffusion_jax.data import digits
    from diffusion_jax.evaluation import digits_check

    images, _ = digits.load_digits_uint8()
    train = images[digits.split_indices()["train"]]
    samples = np.concatenate([train, train[::-1][:100]])  # 1,600: the first 1,500 are real
    scores = qpm.score(samples)
    assert scores["num_samples"] == 1600
    assert scores["frechet_pca_1500"] == pytest.approx(digits_check.digits_frechet_floor(1500))
    assert scores["frechet_pca"] != pytest.approx(scores["frechet_pca_1500"])
    assert "frechet_pca_1500" not in qpm.score(train[:1500])
    top = quality_table.ceiling(3000, [0, 1])
    assert top["frechet_pca"] is None
    assert top["frechet_pca_1500"] == pytest.approx((scores["frechet_pca_1500"], 0.0))
    assert quality_table.ceiling(500, [0])["frechet_pca_1500"] is None


def test_peer_has_our_parameter_count_trains_and_samples_uint8_digits():
    """The diffusers peer: the same parameter count as our default digits U-Net; a tiny copy
    trains its given steps and samples uint8 digits."""
    torch = pytest.importorskip("torch")
    from benchmarks import peer_quality

    config = qpm.recipe_config("default")
    theirs = peer_quality.compare_torch.diffusers_unet(config, peer_quality.SHAPE)
    assert peer_quality.our_param_count(config) == sum(p.numel() for p in theirs.parameters())

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny network: one thread is fastest; restored below
    tiny = qpm.apply_overrides(
        qpm.recipe_config("default"),
        {"model.ch": 8, "model.num_groups": 4, "data.batch_size": 8, "optim.warmup_steps": 1},
    )
    try:
        model, ema, stats = peer_quality.train_peer(
            tiny, seed=0, budget_seconds=1e9, schedule_steps=3
        )
        images = peer_quality.sample_peer(tiny, model, ema, num=3, seed=0, steps=2)
    finally:
        torch.set_num_threads(threads)
    assert stats["steps"] == 3 and not stats["budget_spent"] and stats["steps_per_s"] is None
    assert images.dtype == np.uint8 and images.shape == (3, 8, 8, 1)


def test_peer_follows_a_recipe_of_its_levers_and_refuses_the_others():
    pytest.importorskip("torch")
    from benchmarks import peer_quality

    config, label = peer_quality.peer_config("ch_16")
    assert (label, config.model.ch) == ("diffusers-peer_ch_16", 16)
    assert peer_quality.peer_config("default")[1] == "diffusers-peer"
    with pytest.raises(ValueError, match=r"'v_min_snr_5' changes \['diffusion"):
        peer_quality.peer_config("v_min_snr_5")


def test_score_noise_scores_each_disjoint_set_and_drops_the_remainder():
    from benchmarks import score_noise
    from diffusion_jax.data import digits

    images, _ = digits.load_digits_uint8()
    train = images[digits.split_indices()["train"]][:1100]
    scores = score_noise.chunk_scores(train, 500)  # two sets; the last 100 left out
    assert len(scores["frechet_pca"]) == len(scores["recognisable"]) == 2
    second = qpm.score(train[500:1000])
    assert scores["frechet_pca"][1] == pytest.approx(second["frechet_pca"])
    assert scores["recognisable"][1] == pytest.approx(second["recognisable"])

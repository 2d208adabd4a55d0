"""examples/walkthrough.py --quick end to end: it writes every figure and a table of the four
training ways with finite numbers."""

import importlib.util
import json
import math
import os
import sys

EXAMPLE = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "walkthrough.py")
FIGURES = (
    "noising_digit.png",
    "noising_swissroll.png",
    "schedules.png",
    "chain_check.png",
    "prior.png",
    "reverse_trajectory.png",
    "learned_variance.png",
)
RUNS = ["fixed_small", "fixed_large", "learned_hybrid", "learned_vlb"]
NUMBERS = (
    "final_train_loss",
    "total_bpd",
    "total_bpd_stderr",
    "decoder_bpd",
    "transitions_bpd",
    "prior_bpd",
    "recognisable_fraction",
    "ddpm_recognisable_fraction",
    "train_seconds",
    "nll_seconds",
    "sample_seconds",
)


def load_walkthrough():
    spec = importlib.util.spec_from_file_location("walkthrough", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def test_quick_walkthrough_writes_figures_and_table(tmp_path):
    walkthrough = load_walkthrough()
    assert walkthrough.main(["--out", str(tmp_path), "--quick"]) == 0

    for name in FIGURES:
        path = tmp_path / name
        assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG", name

    results = json.loads((tmp_path / "results.json").read_text())
    rows = results["rows"]
    assert [row["run"] for row in rows] == RUNS
    for row in rows:
        for field in NUMBERS:
            assert math.isfinite(row[field]), (row["run"], field, row[field])
        assert row["train_steps"] == walkthrough.QUICK.train_steps
        assert 0 <= row["classes_present"] <= 10 and 0 <= row["ddpm_classes_present"] <= 10
    for name in walkthrough.STORY_SCHEDULES:
        assert math.isfinite(results["chain_check"][name]["max_mean_diff"])
        assert math.isfinite(results["prior_bpd"][name])
    assert math.isfinite(results["learned_variance"]["mean_interpolation"])

    table = (tmp_path / "results.md").read_text().strip().splitlines()
    assert len(table) == 2 + len(RUNS)
    assert [line.split("|")[1].strip() for line in table[2:]] == RUNS

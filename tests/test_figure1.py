"""figure1 (Figure 1, section 3.3): the epochs-to-target rule, and a tiny run whose kept rates, tables and
figure follow from its own histories."""
import json
import re

import pytest
from PIL import Image

from conftest import run_program
from keras_alexnet.figure1 import common_target, epochs_to_target, fastest


def history(errors):
    return [{"epoch": epoch, "train_error": error, "test_error": error} for epoch, error in enumerate(errors)]


def test_epochs_to_target_is_the_first_crossing_linear_between_epochs():
    assert epochs_to_target(history([0.9, 0.5, 0.3, 0.2]), 0.25) == pytest.approx(2.5)
    assert epochs_to_target(history([0.9, 0.2, 0.4, 0.1]), 0.25) == pytest.approx(0.65 / 0.7)
    assert epochs_to_target(history([0.9, 0.25, 0.1]), 0.25) == 1
    assert epochs_to_target(history([0.2, 0.1]), 0.25) == 0
    assert epochs_to_target(history([0.9, 0.5, 0.3]), 0.25) is None


def test_the_fastest_rate_then_the_lowest_error_is_kept():
    assert fastest({0.01: history([0.9, 0.5, 0.2]), 0.03: history([0.9, 0.2, 0.1]),
                    0.1: history([0.9, 0.9, 0.9])}) == 0.03
    assert fastest({0.01: history([0.9, 0.5, 0.4]), 0.03: history([0.9, 0.6, 0.3])}) == 0.03  # None reaches 25%.
    assert common_target([history([0.9, 0.1]), history([0.9, 0.2])]) == 0.25
    assert common_target([history([0.9, 0.1]), history([0.9, 0.4, 0.5])]) == 0.4


def rows(markdown):
    """The cells of a markdown text's table rows, headers left out."""
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip() not in ("activation", "net")]


def numbers(cell):
    return [float(v) for v in re.findall(r"[-+]?\d+\.\d+", cell)]


@pytest.mark.slow
def test_tiny_run_tables_and_figure_follow_from_the_histories(tmp_path):
    result = run_program("figure1", "--dataset=synthetic", "--max_images=32", "--epochs=2", "--seeds=2",
                         "--learning_rates=0.003,0.03", f"--output_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "histories.json").read_text())
    runs = {(r["activation"], r["learning_rate"], r["seed"], r["lrn"]): r["history"] for r in saved["runs"]}
    assert len(runs) == 2 * (2 + 1) + 2  # Each activation's sweep and its seed 1, then seeds 0 and 1 with LRN.
    assert all([h["epoch"] for h in run] == [0, 1, 2] for run in runs.values())

    kept, names = saved["kept_learning_rates"], {"relu": "ReLU", "tanh": "tanh"}
    sweeps = {a: {rate: runs[a, rate, 0, False] for rate in (0.003, 0.03)} for a in names}
    assert kept == {a: fastest(sweeps[a]) for a in names}
    seed_runs = {a: [runs[a, kept[a], seed, False] for seed in (0, 1)] for a in names}
    target = common_target(seed_runs["relu"] + seed_runs["tanh"])
    epochs = {a: [epochs_to_target(h, target) for h in seed_runs[a]] for a in names}

    sweep, seeds = (tmp_path / "figure1.md").read_text().split("Epochs to reach")
    assert {(name, float(rate)) for name, rate, _, _, mark in rows(sweep) if mark == "yes"} == \
        {(names[a], kept[a]) for a in names}
    assert [numbers(low)[0] for _, _, _, low, _ in rows(sweep)] == pytest.approx(
        [100 * min(h["train_error"] for h in sweeps[a][rate]) for a in names for rate in (0.003, 0.03)], abs=0.051)
    assert seeds.startswith(f" {target:.0%} training error" if target == 0.25 else f" {target:.1%} training error")
    table = {row[0]: row[1:] for row in rows(seeds)}
    for a in names:
        assert float(table[names[a]][0]) == kept[a]
        assert numbers(table[names[a]][1]) == pytest.approx(epochs[a], abs=0.051)
    if all(epochs["relu"]):
        ratios = [t / r for r, t in zip(epochs["relu"], epochs["tanh"])]
        assert numbers(table["tanh / ReLU (seed by seed)"][1]) == pytest.approx(ratios, abs=0.0051)

    lrn = {row[0]: row[1:] for row in rows((tmp_path / "lrn.md").read_text())}
    for name, with_lrn in (("without LRN", False), ("with LRN", True)):
        final = [100 * runs["relu", kept["relu"], seed, with_lrn][-1]["test_error"] for seed in (0, 1)]
        assert numbers(lrn[name][0]) == pytest.approx(final, abs=0.051)

    with Image.open(tmp_path / "figure1.png") as image:
        assert image.size == (600, 400)

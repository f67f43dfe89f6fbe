"""python -m keras_alexnet.benchmark: its table's rows and numbers agree with each other and with the verdict;
bad input is one line. No timing is asserted: the rates are whatever this machine gives."""
import os
import re

import numpy as np
import pytest
from PIL import Image

from conftest import NARROW, run_program
from keras_alexnet import benchmark, distribute

QUICK = [f"--width={NARROW['width']}", "--batch_size=8", "--steps_per_loop=1", "--seconds=0.3"]
ROWS = ["training, synthetic batches on the devices (what the model can take)",
        "training through the input pipeline on {}", "the input pipeline alone on {}"]


def folder(root, images_per_class):
    """Two classes of random 300 x 260 JPEGs."""
    rng = np.random.default_rng(0)
    for name in "ab":
        (root / name).mkdir(parents=True)
        for i in range(images_per_class):
            Image.fromarray(rng.integers(0, 256, (260, 300, 3), np.uint8)).save(root / name / f"{i}.jpg")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["synthetic", "folder"])
def test_the_table_and_its_verdict_agree(tmp_path, dataset):
    """Every rate positive, its share of the model's and its rate per core from the same figures; the verdict
    names the pipeline's share (4 logical CPUs: 2 replicas x 2 towers)."""
    name = dataset if dataset == "synthetic" else str(folder(tmp_path / "images", 8))
    result = run_program("benchmark", f"--dataset={name}", *QUICK)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == ("devices: replica 0 on /device:CPU:0 -> towers on /device:CPU:0, /device:CPU:2; "
                        "replica 1 on /device:CPU:1 -> towers on /device:CPU:1, /device:CPU:3")
    assert lines[1:3] == ["| what | img/s | img/s per core | of the model's |", "|---|---|---|---|"]
    rows = [line.strip("| ").split(" | ") for line in lines[3:6]]
    assert [row[0] for row in rows] == [row.format(name) for row in ROWS]
    rates = [float(row[1]) for row in rows]
    cores = len(os.sched_getaffinity(0))
    assert all(rate > 0 for rate in rates), rates
    for (_, rate, per_core, share), value in zip(rows, rates):
        assert float(per_core) == pytest.approx(value / cores, abs=0.06)
        assert int(share.rstrip("%")) == pytest.approx(100 * value / rates[0], abs=1.5)
    assert rows[0][3] == "100%" and lines[6] == ""
    share = rates[2] / rates[0]
    if share < 1:
        verdict = re.fullmatch(r"input-bound: the pipeline gives (\d+)% of what the model can take; it needs (\d+) "
                               r"cores like these \((\d+) here\) to feed it", lines[7])
        assert verdict and verdict.group(1) == rows[2][3].rstrip("%") and int(verdict.group(3)) == cores, lines[7]
        assert int(verdict.group(2)) == pytest.approx(cores / share, abs=1)
    else:
        assert lines[7] == f"not input-bound: the pipeline gives {share:.1f}x what the model can take"
    assert len(lines) == 8


def test_the_synthetic_batches_are_made_on_the_replicas_devices(logical_cpus):
    strategy = distribute.mirrored_strategy(logical_cpus[:2])
    images, labels = benchmark.resident_batch(strategy, 4, 10)
    for part in images, labels:
        assert [t.device for t in strategy.experimental_local_results(part)] == list(strategy.extended.worker_devices)
        assert [t.shape[0] for t in strategy.experimental_local_results(part)] == [2, 2]


@pytest.mark.parametrize("flag, error", [
    ("--seconds=0", "error: --seconds must be positive, got 0.0"),
    ("--batch_size=64", "has 4 training images, fewer than one batch of 64: lower --batch_size")])
def test_bad_input_is_one_line(tmp_path, flag, error):
    images = folder(tmp_path / "images", 2)
    result = run_program("benchmark", f"--dataset={images}", *QUICK, flag)
    assert result.returncode == 1 and error in result.stderr.strip().splitlines()[-1], result.stderr[-3000:]
    assert "Traceback" not in result.stderr

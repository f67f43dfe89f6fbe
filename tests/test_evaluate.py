"""keras_alexnet.evaluate: centre-crop and 10-crop errors of a run, checked against numpy."""
import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import NARROW, reference_errors, run_program, write_run
from keras_alexnet import metrics, preprocess
from keras_alexnet.model import build_alexnet

# 7 colours, a channel mask each: with more than 5 classes a label can fall outside the top 5.
COLOURS = {"blue": (0, 0, 1), "cyan": (0, 1, 1), "green": (0, 1, 0), "magenta": (1, 0, 1), "red": (1, 0, 0),
           "white": (1, 1, 1), "yellow": (1, 1, 0)}
CLASSES = sorted(COLOURS)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory with a checkpoint of a 7-class narrow model, and a small folder dataset."""
    root = tmp_path_factory.mktemp("evaluate")
    rng = np.random.default_rng(0)
    for split, count in [("train", 1), ("val", 2)]:
        for name in CLASSES:
            (root / "data" / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 80, (240, 300, 3), dtype=np.uint8)
                pixels += np.uint8(170) * np.array(COLOURS[name], np.uint8)  # Dominant channels per class.
                Image.fromarray(pixels).save(root / "data" / split / name / f"{i}.jpg")
    model_kwargs = {"num_classes": len(CLASSES), "init": "glorot", **NARROW}
    model = build_alexnet(**model_kwargs, seed=1)
    write_run(root / "run", model, model_kwargs, CLASSES, step=42, dataset=str(root / "data"))
    return root, model


def expected_errors(model, val_folder, ten_crop):
    """Top-1/top-5 errors computed with numpy from the model's outputs on each image's views, each
    image labelled by the run's label of its folder's name."""
    paths = sorted(val_folder.glob("*/*.jpg"))
    images = [preprocess.decode_and_resize(path.read_bytes()) for path in paths]
    labels = [CLASSES.index(path.parent.name) for path in paths]
    return (*reference_errors(model, images, labels, preprocess.Stats.imagenet().mean_image, ten_crop), len(paths))


def run_evaluate(*args):
    return run_program("evaluate", *args, "--batch_size=5")


def assert_report(report, stdout, model, val_folder, images):
    """The report's errors are numpy's; returns numpy's top-5 errors (centre crop, 10-crop)."""
    top5_errors = []
    for name, ten_crop in [("centre crop", False), ("10-crop", True)]:
        top1, top5, n = expected_errors(model, val_folder, ten_crop)
        got = report["results"][name]
        assert got["images"] == n == images
        assert got["top1_error"] == pytest.approx(top1) and got["top5_error"] == pytest.approx(top5)
        assert f"| {name} | {top1:.2%} | {top5:.2%} |" in stdout
        top5_errors.append(top5)
    return top5_errors


@pytest.mark.slow
def test_evaluate_cli_reports_the_errors_numpy_computes(run_dir):
    root, model = run_dir
    result = run_evaluate(f"--model_dir={root / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((root / "run" / "eval_data_validation.json").read_text())
    assert (report["step"], report["dataset"], report["split"]) == (42, str(root / "data"), "validation")
    top5_errors = assert_report(report, result.stdout, model, root / "data" / "val", 14)
    assert max(top5_errors) > 0  # Some label is outside the top 5: top-5 is really tested.
    # Not a terminal: progress as plain lines ("3/3 done, 2.1 batch/s"), no control codes.
    assert "\x1b" not in result.stdout and "\r" not in result.stdout and "/3 done, " in result.stdout


def copy_classes(root, name, classes):
    """A dataset `name` of the run's images: train/ as the run's, val/ of `classes` (blue's images for
    a class the run lacks)."""
    for split, folders in [("train", CLASSES), ("val", classes)]:
        for folder in folders:
            (root / name / split / folder).mkdir(parents=True)
            for image in (root / "data" / split / (folder if folder in CLASSES else "blue")).iterdir():
                (root / name / split / folder / image.name).write_bytes(image.read_bytes())
    return root / name


@pytest.mark.slow
def test_evaluate_a_dataset_of_fewer_classes_labels_them_by_name(run_dir):
    root, model = run_dir
    dataset = copy_classes(root, "two colours", ["blue", "red"])
    result = run_evaluate(f"--model_dir={root / 'run'}", f"--dataset={dataset}")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((root / "run" / "eval_two_colours_validation.json").read_text())
    assert (report["dataset"], report["split"]) == (str(dataset), "validation")
    assert_report(report, result.stdout, model, dataset / "val", 4)  # red is label 4, as in the run.


def test_evaluate_a_dataset_of_other_classes_is_one_line(run_dir):
    root, _ = run_dir
    dataset = copy_classes(root, "purple", ["blue", "purple"])
    result = run_evaluate(f"--model_dir={root / 'run'}", f"--dataset={dataset}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {dataset / 'val'} has classes its labels do not know: 'purple' (the 7 known: "
        + ", ".join(f"'{name}'" for name in CLASSES) + ")")


def test_evaluate_cli_bad_run_is_one_line(tmp_path):
    result = run_program("evaluate", f"--model_dir={tmp_path}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path} is not a training run: it has no config.json"


def test_totals_count_top_k_and_skip_label_minus_one():
    probabilities = tf.constant([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    loss, top1, top5, images = metrics.totals(tf.constant([2, 0, -1]), probabilities).numpy()
    assert (top1, top5, images) == (1, 2, 2)
    np.testing.assert_allclose(loss, -np.log(0.2) - np.log(0.5), rtol=1e-6)
    ranks = metrics.label_rank(tf.constant([2, 0, 1]), probabilities).numpy()
    assert list(ranks) == [1, 0, 2]  # Row 3: class 2 scores higher and class 0 ties: both count.


def test_ties_are_misses():
    """Outputs that are all equal must score 100% error, not 0% (tf.math.in_top_k calls a tie a hit)."""
    summed = metrics.totals(tf.constant([0, 3, 5, 9]), tf.fill([4, 10], 0.1))
    errors = metrics.errors(summed.numpy())
    assert errors["top1_error"] == 1.0 and errors["top5_error"] == 1.0 and errors["images"] == 4


def test_nan_outputs_are_misses():
    """A NaN compares False, so `>=` alone ranked a NaN label's score first: 0% error for a broken net."""
    nan = float("nan")
    probabilities = tf.constant([[nan, 0.5, 0.5], [0.2, nan, 0.8], [nan] * 3, [0.1, 0.2, 0.7]])
    loss, top1, top5, images = metrics.totals(tf.constant([0, 2, 1, 2]), probabilities).numpy()
    assert (top1, top5, images) == (1, 1, 4)  # Only the row without NaN is a hit.

"""keras_alexnet.predict: top-k lines, CSV / JSON lines, skipped files, progress and --ten_crop."""
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import NARROW, run_program
from keras_alexnet import checkpoint, predict, preprocess
from keras_alexnet.export import export_saved_model
from keras_alexnet.model import build_alexnet


def run_predict(*args):
    return run_program("predict", *args)


def expected_top(saved_model, files, k):
    """[(label, class, probability)] * k per file, from the signature called directly and numpy's sort."""
    signature = tf.saved_model.load(str(saved_model)).signatures["predict_images"]
    probabilities = signature(image_bytes=tf.constant([Path(f).read_bytes() for f in files]))["probabilities"]
    labels = checkpoint.read_labels(str(saved_model / "assets" / checkpoint.LABELS))
    return [[(labels[i], int(i), float(p[i])) for i in np.argsort(-p)[:k]] for p in probabilities.numpy()]  # Batch
    # composition moves probabilities by ~1e-6 (oneDNN), hence atol=1e-5 below.


CLASSES = [f"class {i}" for i in range(10)]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    """The centre-crop export of a narrow 10-class net (Glorot: distinct outputs per image)."""
    model = build_alexnet(10, seed=0, init="glorot", **NARROW)
    return Path(export_saved_model(model, CLASSES, preprocess.Stats.imagenet(), str(tmp_path_factory.mktemp("export")), 1))


@pytest.fixture(scope="module")
def folder(photos, tmp_path_factory):
    """The photos, one in a subfolder, beside a corrupt JPEG and an empty PNG."""
    root = tmp_path_factory.mktemp("predict")
    (root / "nested").mkdir()
    for i, photo in enumerate(photos):
        shutil.copy(photo, root / ("nested" if i == 0 else ".") / Path(photo).name)
    (root / "broken.jpg").write_bytes(Path(photos[0]).read_bytes()[:300])  # Cut short.
    (root / "empty.png").write_bytes(b"")
    return root


@pytest.mark.slow
def test_files_and_folders_print_top_k_and_write_json_lines(saved_model, photos, tmp_path):
    output = tmp_path / "predictions.jsonl"
    result = run_predict(f"--saved_model={saved_model}", str(Path(photos[0]).parent), "--top_k", "3",
                         f"--output={output}")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[-1] == f"{len(photos)} images classified (centre crop); skipped 0 unreadable files"
    assert "batch 1/" not in result.stderr  # One batch: no progress.
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["file"] for row in rows] == photos
    for line, row, top in zip(lines, rows, expected_top(saved_model, photos, 3)):
        assert [(t["label"], t["class"]) for t in row["top_k"]] == [(label, index) for label, index, _ in top]
        np.testing.assert_allclose([t["probability"] for t in row["top_k"]], [p for _, _, p in top], atol=1e-5)
        assert line == f"{row['file']}: " + " | ".join(f"{p:.2%} {label}" for label, _, p in top)


@pytest.mark.slow
def test_unreadable_files_are_skipped_counted_and_named(saved_model, folder, tmp_path):
    output = tmp_path / "predictions.csv"
    result = run_predict(f"--saved_model={saved_model}", str(folder), f"--output={output}", "--batch_size=2")
    assert result.returncode == 0, result.stderr[-3000:]
    good = [str(p) for p in sorted(folder.glob("*.*")) if p.name not in ("broken.jpg", "empty.png")]
    good += [str(p) for p in sorted((folder / "nested").iterdir())]  # Sorted, a folder's files before its folders.
    assert result.stdout.splitlines()[-1] == (f"{len(good)} images classified (centre crop); skipped 2 unreadable "
                                              f"files: {folder / 'broken.jpg'}, {folder / 'empty.png'}")
    assert "batch 1/3" in result.stderr and "batch 3/3" in result.stderr  # Not a terminal: plain lines.
    with open(output, newline="") as f:
        table = list(csv.reader(f))
    assert table[0][:4] == ["file", "label_1", "class_1", "probability_1"] and len(table[0]) == 1 + 3 * 5
    assert [row[0] for row in table[1:]] == good
    expected = dict(zip(good, expected_top(saved_model, good, 5)))
    for row in table[1:]:
        assert row[1::3] == [label for label, _, _ in expected[row[0]]]
        np.testing.assert_allclose([float(p) for p in row[3::3]], [p for _, _, p in expected[row[0]]], atol=1e-5)


@pytest.mark.parametrize("case", ["ten_crop of a centre-crop export", "missing path", "bad output"])
def test_bad_input_fails_in_one_line(case, saved_model, photos, tmp_path):
    args = {"ten_crop of a centre-crop export": ["--ten_crop", photos[0]],
            "missing path": [str(tmp_path / "nowhere.jpg")],
            "bad output": [f"--output={tmp_path / 'p.txt'}", photos[0]]}[case]
    result = run_predict(f"--saved_model={saved_model}", *args)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert {"ten_crop of a centre-crop export": "was not exported with --ten_crop",
            "missing path": "no such file or folder", "bad output": "--output must end in .csv"}[case] in lines[0]


def test_ten_crop_export(photos, tmp_path, capsys):
    """With a 10-crop export, --ten_crop is accepted and the lines are its averaged probabilities."""
    saved_model = Path(export_saved_model(build_alexnet(10, seed=0, init="glorot", **NARROW), CLASSES,
                                          preprocess.Stats.imagenet(), str(tmp_path), 1, ten_crop=True))
    done, skipped = predict.run(str(saved_model), photos, top_k=2, ten_crop=True)
    lines = capsys.readouterr().out.splitlines()
    assert (done, skipped) == (len(photos), [])
    assert lines[-1] == f"{len(photos)} images classified (mean of 10 crops); skipped 0 unreadable files"
    for line, photo, top in zip(lines, photos, expected_top(saved_model, photos, 2)):
        assert line == f"{photo}: " + " | ".join(f"{p:.2%} {label}" for label, _, p in top)

"""python -m keras_alexnet.prepare: section 2's 256x256 images stored once as TFDS array_record files, read
back as the on-the-fly pipeline makes them (up to JPEG's loss), with the training split's statistics; a
killed prepare resumes."""
import io
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from conftest import SHARED_DATA, run_cli, run_program
from keras_alexnet import cli, preprocess, sources, stats

# JPEG quality 95 without chroma subsampling against decode_and_resize's uint8 image: measured on the
# shared photos, mean absolute difference 1.7 levels and at most 22; on the drawings below 1.0 and 28.
MEAN_BOUND, MAX_BOUND = 2.5, 40
SIZES = [(300, 400), (400, 300), (256, 256), (240, 720), (900, 150), (100, 130)]  # (height, width)


def drawing(height, width, seed):
    """A smooth picture (waves, a gradient and a flat disc with sharp edges), as photos are, not noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    a, b = rng.uniform(0.5, 3, 2)
    scale = max(height, width)
    image = np.stack([128 + 100 * np.sin(a * 6 * x / scale + b), 128 + 100 * np.cos(b * 5 * y / scale),
                      255 * x * y / scale ** 2], -1)
    centre, radius = rng.uniform(0.2, 0.8, 2) * (height, width), min(height, width) / 4
    image[(y - centre[0]) ** 2 + (x - centre[1]) ** 2 < radius ** 2] = rng.integers(0, 256, 3)
    return np.clip(image, 0, 255).astype(np.uint8)


def jpeg(array, mode=None):
    buffer = io.BytesIO()
    (Image.fromarray(array).convert(mode) if mode else Image.fromarray(array)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """train/ (3 classes, 6 sizes and shapes, a greyscale JPEG, an RGBA PNG, a JPEG cut in half, and the
    shared photos when there are some) and val/ (2 of the classes)."""
    root = tmp_path_factory.mktemp("prepare") / "images"
    for split, classes, sizes in [("train", ["circle", "square", "stripes"], SIZES),
                                  ("val", ["circle", "square"], SIZES[:2])]:
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for i, (height, width) in enumerate(sizes):
                mode = "L" if (split, c, i) == ("train", 1, 2) else None
                image = drawing(height, width, 100 * c + i + len(split))
                (root / split / name / f"{i}.jpg").write_bytes(jpeg(image, mode))
    rgba = np.dstack([drawing(320, 280, 7), np.full((320, 280), 200, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "train" / "square" / "alpha.png")
    whole = (root / "train" / "circle" / "0.jpg").read_bytes()
    (root / "train" / "circle" / "cut.jpg").write_bytes(whole[:len(whole) // 2])
    if (SHARED_DATA / "skimage_photos").exists():
        shutil.copytree(SHARED_DATA / "skimage_photos", root / "train" / "photos",
                        ignore=shutil.ignore_patterns("*.md"))
    return root


def prepare(dataset, output, *flags, **kwargs):
    return run_cli("-m", "keras_alexnet.prepare", f"--dataset={dataset}", f"--output={output}", *flags, **kwargs)


@pytest.fixture(scope="module")
def prepared(folder):
    """The folder prepared by 2 processes in shards of 4 images: (directory, the program's output)."""
    output = folder.parent / "prepared"
    result = prepare(folder, output, "--processes=2", "--shard_size=4")
    assert result.returncode == 0, result.stderr[-3000:]
    return output, result.stdout


def originals(folder, split):
    """(path, label) of the split's files, in the order of sources.load_source (the prepared order)."""
    names = sources.load_source(str(folder), "train").class_names
    source = sources.load_source(str(folder), split, class_names=names)
    return [(path.decode(), int(label)) for path, label in source.records.as_numpy_iterator()]


def stored(directory, split):
    """(uint8 [256, 256, 3], label) of the prepared split, as training decodes them."""
    images, _ = sources.decoded_images(sources.load_source(str(directory), split))
    return [(image, int(label)) for image, label in images.as_numpy_iterator()]


def differences(folder, prepared_dir, split):
    """{path: |stored image - decode_and_resize(file)|} of each stored image; the labels must agree."""
    files = [(path, label) for path, label in originals(folder, split) if not path.endswith("cut.jpg")]
    found = {}
    for (path, label), (image, stored_label) in zip(files, stored(prepared_dir, split), strict=True):
        assert stored_label == label, path
        expected = preprocess.decode_and_resize(tf.io.read_file(path)).numpy()
        found[path] = np.abs(image.astype(int) - expected)
    return found


@pytest.mark.parametrize("split", ["train", "validation"])
def test_every_record_is_the_on_the_fly_image_up_to_jpeg(folder, prepared, split):
    found = differences(folder, prepared[0], split)
    assert len(found) == {"train": 18 + 1 + len(list((folder / "train" / "photos").glob("*"))),
                          "validation": 4}[split]
    for path, difference in found.items():
        assert difference.mean() < MEAN_BOUND and difference.max() < MAX_BOUND, (path, difference.mean(),
                                                                                  difference.max())


def test_prepared_records_skip_the_checks_and_decode_as_with_them(prepared):
    """A prepared record is decoded without the header and Exif checks: the same pixels as through them."""
    source = sources.load_source(str(prepared[0]), "train")
    assert source.load is sources.decode_prepared
    fast, _ = sources.decoded_images(source)
    checked, _ = sources.decoded_images(source._replace(load=preprocess.decode))
    fast, checked = list(fast.as_numpy_iterator()), list(checked.as_numpy_iterator())
    assert len(fast) == len(checked) == source.num_examples
    for (image, label), (want, want_label) in zip(fast, checked):
        assert label == want_label
        np.testing.assert_array_equal(image, want)


def test_only_prepares_own_folders_skip_the_checks(prepared, tmp_path):
    """Another TFDS builder's folder (no prepare.json) is decoded with the checks; decode_prepared itself
    takes nothing but a 256 x 256 JPEG (a PNG, which decode_jpeg would decode, or another size fail)."""
    foreign = tmp_path / "foreign"
    shutil.copytree(prepared[0], foreign)
    (foreign / sources.PREPARE_FACTS).unlink()
    assert sources.load_source(str(foreign), "train").load is preprocess.decode
    square = drawing(256, 256, 1)
    assert sources.decode_prepared(tf.constant(jpeg(square))).shape == (256, 256, 3)
    png = io.BytesIO()
    Image.fromarray(square).save(png, "PNG")
    for wrong in (jpeg(drawing(256, 300, 1)), png.getvalue()):
        with pytest.raises(tf.errors.InvalidArgumentError):
            sources.decode_prepared(tf.constant(wrong))


def test_the_shared_photos_are_within_the_bound(folder, prepared, photos):
    """Real photos: a 640 x 427 JPEG, 451 x 300 and 600 x 400 PNGs."""
    found = {path: d for path, d in differences(folder, prepared[0], "train").items() if "/photos/" in path}
    assert sorted(Path(path).name for path in found) == sorted(Path(path).name for path in photos)
    whole = np.stack(list(found.values()))
    assert whole.mean() < MEAN_BOUND and whole.max() < MAX_BOUND, (whole.mean(), whole.max())


def test_classes_corrupt_file_and_random_access(folder, prepared):
    directory, printed = prepared
    train = sources.load_source(str(directory), "train")
    assert train.lookup is not None and train.class_names == sorted(p.name for p in (folder / "train").iterdir())
    assert train.num_examples == len(originals(folder, "train")) - 1
    validation = sources.load_source(str(directory), "val")
    assert validation.class_names == train.class_names and validation.num_examples == 4
    cut = str(folder / "train" / "circle" / "cut.jpg")
    skipped = (directory / "skipped.txt").read_text().splitlines()
    assert len(skipped) == 1 and skipped[0].startswith(f"train\t{cut}\tjpeg::Uncompress failed")
    assert f"skipped train: {cut} (jpeg::Uncompress failed" in printed
    builder = tfds.builder_from_directory(str(directory))  # TFDS reads it without keras_alexnet.
    examples = builder.as_data_source("train")
    assert len(examples) == train.num_examples and examples[0]["image"].shape == (256, 256, 3)
    assert builder.info.features["label"].names == train.class_names
    assert [p.name for p in directory.iterdir() if "array_record" in p.name and p.name.startswith(".")] == []


@pytest.mark.slow
def test_a_damaged_shard_is_named_in_one_line_and_prepare_writes_it_anew(folder, prepared, tmp_path):
    """A byte flipped in a shard (a disk's damage): array_record's hash check fails the read, and the
    program names the file in one line instead of a traceback through tf.numpy_function. Deleted as the
    line says, prepare writes that shard alone again."""
    directory, _ = prepared
    damaged = tmp_path / "prepared"
    shutil.copytree(directory, damaged)
    shard = sorted(damaged.glob("*-train.array_record-*"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = run_program("stats", f"--dataset={damaged}", f"--output={tmp_path / 'stats.npz'}")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr[-3000:]
    assert result.stderr.startswith(f"error: {shard} cannot be read (") and result.stderr.endswith(
        "): delete it and run prepare again, which writes it anew\n"), result.stderr
    assert not (tmp_path / "stats.npz").exists()
    from_its_third = sources.load_source(str(damaged), "train[2:]")  # The file named through a split's offset.
    with pytest.raises(tf.errors.OpError) as raised:
        list(sources.decoded_images(from_its_third)[0])
    assert cli.one_line(raised.value).startswith(f"{shard} cannot be read ("), raised.value.message[-2000:]
    shard.unlink()
    result = prepare(folder, damaged, "--shard_size=4")
    assert result.returncode == 0 and result.stdout.startswith(f"{damaged}: 1 shards of 4 images to write, "), \
        result.stdout + result.stderr[-2000:]
    assert run_program("stats", f"--dataset={damaged}", f"--output={tmp_path / 'stats.npz'}").returncode == 0


def test_stats_are_those_of_the_stored_training_images(prepared):
    directory, _ = prepared
    written = preprocess.Stats.load(str(directory / "stats.npz"))
    images, _ = sources.decoded_images(sources.load_source(str(directory), "train"))
    expected = stats.compute_stats(images)
    for name in ("mean_image", "channel_mean", "eigenvalues"):
        np.testing.assert_allclose(getattr(written, name), getattr(expected, name), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.abs(written.eigenvectors), np.abs(expected.eigenvectors), atol=1e-5)


def test_other_settings_or_another_s_folder_are_refused_in_one_line(folder, prepared, tmp_path):
    directory, _ = prepared
    before = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}
    for flags, message in [(["--quality=90"], "quality 95, not 90"), ([], "shard_size 4, not 1024"),
                           (["--splits=train"], 'splits ["train", "validation"], not ["train"]')]:
        flags += [] if not flags else ["--shard_size=4"]
        result = run_program("prepare", f"--dataset={folder}", f"--output={directory}", *flags)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr[-2000:]
        assert result.stderr.startswith(f"error: {directory} was prepared with {message}")
        assert "give the same settings to resume it, or another --output" in result.stderr
    assert {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == before
    (tmp_path / "mine.txt").write_text("not a prepare's")
    result = run_program("prepare", f"--dataset={folder}", f"--output={tmp_path}")
    assert result.returncode == 1 and result.stderr == \
        f"error: --output {tmp_path} holds files but no prepare.json: name a new or empty folder\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def group_alive(group):
    """Whether a process of the process group `group` runs (zombies aside), by /proc."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # Ended meanwhile.
            continue
        if int(fields[2]) == group and fields[0] != "Z":  # state, ppid, pgrp, ...
            return True
    return False


@pytest.mark.slow
def test_a_killed_prepare_resumes_keeping_its_finished_shards(folder, prepared, tmp_path):
    """kill -9 of the parent once a shard is finished: the workers end with it; run again, the finished
    shards are kept as they are, the others written, and the records are those of an uninterrupted run
    (in shards of 1 here, of 4 there)."""
    output = tmp_path / "killed"
    command = [sys.executable, "-m", "keras_alexnet.prepare", f"--dataset={folder}", f"--output={output}",
               "--processes=2", "--shard_size=1"]
    run = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list((output / "parts").glob("*.npz")) and time.time() < deadline and run.poll() is None:
        time.sleep(0.01)
    run.send_signal(signal.SIGKILL)
    run.wait()
    while group_alive(run.pid):  # Its workers end by themselves.
        assert time.time() < deadline, "the workers outlived the killed prepare"
        time.sleep(0.1)
    assert not (output / "dataset_info.json").exists() and (output / "prepare.json").exists()
    with pytest.raises(preprocess.DataError, match="keras_alexnet.prepare that has not finished: run it again"):
        sources.load_source(str(output), "train")
    finished = {part.stem: part for part in (output / "parts").glob("*.npz")}
    kept = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in output.glob("prepared-*")
            if p.name.replace("prepared-", "").replace(".array_record", "") in finished}
    assert kept
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f", {len(kept)} kept" in result.stdout.splitlines()[0]
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in kept} == kept
    assert not [p.name for p in output.iterdir() if p.name.endswith(".tmp")]
    for split in ("train", "validation"):
        for (image, label), (want, want_label) in zip(stored(output, split), stored(prepared[0], split), strict=True):
            np.testing.assert_array_equal(image, want)
            assert label == want_label
    resumed, whole = (preprocess.Stats.load(str(d / "stats.npz")) for d in (output, prepared[0]))
    np.testing.assert_allclose(resumed.mean_image, whole.mean_image, atol=1e-4)
    np.testing.assert_allclose(resumed.eigenvalues, whole.eigenvalues, rtol=1e-6)
    assert (output / "skipped.txt").read_text() == (prepared[0] / "skipped.txt").read_text()


@pytest.mark.slow
def test_a_tfds_dataset_read_in_order_is_prepared_by_parts(tmp_path):
    """A tfrecord TFDS dataset (no random access) without a validation split: each worker reads its
    shard's part of the files (tfds.even_splits); the records keep the split's order."""
    from test_data import AlexnetTestImages  # Defining it registers the builder.
    tfds.builder(AlexnetTestImages.name, data_dir=str(tmp_path / "tfds")).download_and_prepare()
    result = prepare(AlexnetTestImages.name, tmp_path / "out", f"--data_dir={tmp_path / 'tfds'}", "--processes=2",
                     "--shard_size=4")
    assert result.returncode == 0, result.stderr[-3000:]
    for split, count in [("train", 18), ("validation", 2)]:
        original = sources.load_source(AlexnetTestImages.name, split, data_dir=str(tmp_path / "tfds"))
        assert original.lookup is None and sources.load_source(str(tmp_path / "out"), split).lookup is not None
        expected = list(sources.decoded_images(original)[0].as_numpy_iterator())
        found = stored(tmp_path / "out", split)
        assert len(found) == count
        for (image, label), (want, want_label) in zip(found, expected, strict=True):
            assert label == want_label and np.abs(image.astype(int) - want).max() <= 1
    facts = json.loads((tmp_path / "out" / "prepare.json").read_text())
    assert facts["examples"] == {"train": 18, "validation": 2} and facts["class_names"] == ["dark", "light"]


@pytest.mark.slow
def test_train_takes_a_prepared_folder_and_its_stats(prepared, tmp_path):
    directory, _ = prepared
    result = run_cli("-m", "keras_alexnet.train", f"--dataset={directory}", f"--stats={directory / 'stats.npz'}",
                     "--width=0.0625", "--batch_size=2", "--steps_per_epoch=1", "--epochs=1", "--eval_steps=1",
                     f"--model_dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epoch 1: train loss" in result.stdout
    saved = preprocess.Stats.load(str(tmp_path / "run" / "stats.npz"))
    np.testing.assert_array_equal(saved.mean_image, preprocess.Stats.load(str(directory / "stats.npz")).mean_image)

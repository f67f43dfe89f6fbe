"""The input pipeline (sections 2 and 4.1) against numpy: decode, crops, flips, lighting, stats, errors."""
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from conftest import run_program, shared_data
from keras_alexnet import data, preprocess, sources, stats as stats_cli, synthetic

REPO = Path(__file__).resolve().parents[1]


def encode(array, fmt="PNG", mode=None):
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(buffer, fmt)
    return buffer.getvalue()


def zero_stats(mean_image=None):
    return preprocess.Stats(mean_image=np.zeros((256, 256, 3)) if mean_image is None else mean_image,
                      channel_mean=np.zeros(3), eigenvalues=[0.2, 0.02, 0.004], eigenvectors=np.eye(3))


def constant_source(images, labels=None):
    """A Source over given uint8 [256, 256, 3] arrays, labels = position unless given."""
    labels = np.arange(len(images), dtype=np.int32) if labels is None else np.asarray(labels, np.int32)
    return sources.array_source(np.stack(images), labels, ["x"])


def collect(dataset, batches=-1):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in dataset.take(batches)])
    return np.concatenate(xs), np.concatenate(ys)


def epochs(source, batch_size, stats, count, **kwargs):
    """The batches of `count` training epochs, concatenated."""
    parts = [collect(data.train_pipeline(source, batch_size, stats, epoch=e, **kwargs)) for e in range(count)]
    return tuple(np.concatenate(part) for part in zip(*parts))


@pytest.fixture(scope="session")
def coordinates():
    """A 256x256 image whose red / green values are the row / column of the pixel."""
    rows, cols = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    return np.stack([rows, cols, np.full_like(rows, 7)], axis=-1).astype(np.uint8)


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """3 classes of good images (JPEG, PNG, greyscale, odd sizes) plus 4 corrupt files and a README."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    good = 0
    for c, name in enumerate(["cat", "ant", "bee"]):  # Sorted: ant, bee, cat.
        (root / name).mkdir()
        for i, (h, w) in enumerate([(256, 300), (300, 256), (180, 400), (512, 512)]):
            array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            fmt, suffix = [("PNG", ".png"), ("JPEG", ".jpg"), ("JPEG", ".JPEG"), ("BMP", ".bmp")][i]
            (root / name / f"img{i}{suffix}").write_bytes(encode(array, fmt, "L" if (c, i) == (0, 1) else None))
            good += 1
    whole = encode(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8), "JPEG")
    (root / "ant" / "truncated.jpg").write_bytes(whole[:len(whole) // 2])
    (root / "ant" / "empty.jpg").write_bytes(b"")
    (root / "bee" / "text.jpg").write_text("not an image at all\n")
    (root / "cat" / "pixel.png").write_bytes(encode(np.zeros((1, 1, 3), np.uint8)))
    (root / "cat" / "README.txt").write_text("ignored: not an image extension")
    return root, good, 4


def test_a_stats_file_that_is_no_npz_is_named(tmp_path):
    (tmp_path / "notes.txt").write_text("mean: 120\n")
    np.save(tmp_path / "mean.npy", np.zeros(3))
    preprocess.Stats.imagenet().save(str(tmp_path / "whole.npz"))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "whole.npz").read_bytes()[:100])
    for name in ("notes.txt", "mean.npy", "cut.npz"):
        with pytest.raises(preprocess.DataError, match=f"statistics file .*{name} is not an .npz of python -m keras"):
            preprocess.Stats.load(str(tmp_path / name))


# ----------------------------------------------------------------------------- in-graph helpers

def test_decode_and_resize_shorter_side_then_centre(coordinates):
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 256, (256, 400, 3), dtype=np.uint8)  # Shorter side already 256: crop only.
    out = preprocess.decode_and_resize(tf.constant(encode(wide)))
    assert out.dtype == tf.uint8 and out.shape == (256, 256, 3)
    np.testing.assert_array_equal(out.numpy(), wide[:, 72:328])
    tall = np.repeat(np.repeat(rng.integers(0, 256, (200, 128, 3), dtype=np.uint8), 2, 0), 2, 1)  # 400x256
    np.testing.assert_array_equal(tf.function(preprocess.decode_and_resize)(tf.constant(encode(tall))).numpy(),
                                  tall[72:328])
    small = np.full((100, 150, 3), (200, 30, 90), np.uint8)  # Upscaled: a flat colour stays flat.
    np.testing.assert_array_equal(preprocess.decode_and_resize(tf.constant(encode(small))).numpy(),
                                  np.full((256, 256, 3), (200, 30, 90), np.uint8))


@pytest.mark.parametrize("fmt,mode", [("JPEG", "L"), ("JPEG", "CMYK"), ("PNG", "RGBA"), ("PNG", "L"),
                                      ("GIF", None), ("BMP", None)])
def test_decode_formats_give_rgb(fmt, mode):
    colour = (200, 40, 90) if mode != "L" else (120, 120, 120)
    out = preprocess.decode_and_resize(tf.constant(encode(np.full((64, 96, 3), colour, np.uint8), fmt, mode))).numpy()
    assert out.shape == (256, 256, 3)
    tolerance = 40 if fmt == "GIF" else 6  # GIF's palette, JPEG's chroma loss.
    assert np.abs(out.astype(int) - colour).max() <= tolerance, out.reshape(-1, 3).mean(0)


@pytest.mark.parametrize("fmt, options", [("JPEG", {}), ("PNG", {}), ("GIF", {}), ("BMP", {}), ("WEBP", {}),
                                          ("WEBP", {"lossless": True}), ("WEBP", {"exif": b"Exif\0\0x"})])
def test_image_size_reads_the_header_as_decoding_finds_it(fmt, options):
    for height, width in [(20, 37), (301, 9)]:
        encoded = io.BytesIO()
        Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(encoded, fmt, **options)
        assert preprocess.image_size(encoded.getvalue()).numpy().tolist() == [height, width]
        assert tf.io.decode_image(encoded.getvalue(), expand_animations=False).shape[:2] == (height, width)


def test_image_size_of_a_top_down_bmp_and_of_no_image():
    bmp = bytearray(encode(np.zeros((20, 30, 3), np.uint8), "BMP"))
    bmp[22:26] = (-20).to_bytes(4, "little", signed=True)  # Rows stored top to bottom.
    assert preprocess.image_size(bytes(bmp)).numpy().tolist() == [20, 30] == list(tf.io.decode_image(bytes(bmp)).shape[:2])
    for junk in [b"", b"GIF", b"not an image"]:
        assert preprocess.image_size(junk).numpy().tolist() == [-1, -1]
        with pytest.raises(tf.errors.InvalidArgumentError, match="not a JPEG, PNG, GIF, BMP or WebP image"):
            preprocess.decode_and_resize(junk)


def test_center_crop_single_and_batch():
    images = np.random.default_rng(2).random((2, 256, 250, 3)).astype(np.float32)
    np.testing.assert_array_equal(preprocess.center_crop(images).numpy(), images[:, 14:241, 11:238])
    np.testing.assert_array_equal(preprocess.center_crop(images[0], 200).numpy(), images[0, 28:228, 25:225])


def test_ten_crop_views_and_order():
    image = np.random.default_rng(3).random((256, 256, 3)).astype(np.float32)
    views = preprocess.ten_crop(tf.constant(image)).numpy()
    expected = [image[14:241, 14:241], image[:227, :227], image[:227, 29:], image[29:, :227], image[29:, 29:]]
    expected += [view[:, ::-1] for view in expected]
    assert views.shape == (10, 227, 227, 3)
    for i, view in enumerate(expected):
        np.testing.assert_array_equal(views[i], view, err_msg=f"view {i}")


def test_lighting_offset_is_the_formula_along_the_eigenvectors():
    stats = preprocess.Stats.imagenet()
    np.testing.assert_array_equal(preprocess.lighting_offset(tf.zeros(3), stats).numpy(), 0)
    alphas = np.array([0.1, -0.2, 0.05], np.float32)
    shift = preprocess.lighting_offset(alphas, stats).numpy()
    expected = stats.eigenvectors @ (alphas * stats.eigenvalues) * 255  # sum_i alpha_i lambda_i p_i.
    np.testing.assert_allclose(shift, expected, rtol=1e-6)
    # The shift lies along the eigenvectors with weights alpha_i * lambda_i * 255.
    np.testing.assert_allclose(stats.eigenvectors.T @ shift, alphas * stats.eigenvalues * 255, atol=2e-2)


def test_imagenet_stats_and_round_trip(tmp_path):
    stats = preprocess.Stats.imagenet()
    np.testing.assert_allclose(stats.mean_image[100, 3], [123.68, 116.78, 103.94])
    np.testing.assert_allclose(stats.eigenvalues, [0.2175, 0.0188, 0.0045])
    np.testing.assert_allclose(stats.eigenvectors.T @ stats.eigenvectors, np.eye(3), atol=2e-3)
    stats.save(tmp_path / "s.npz")
    loaded = preprocess.Stats.load(str(tmp_path / "s.npz"))
    for name in ["mean_image", "channel_mean", "eigenvalues", "eigenvectors"]:
        np.testing.assert_array_equal(getattr(loaded, name), getattr(stats, name))
        assert getattr(loaded, name).dtype == np.float32
    with pytest.raises(FileNotFoundError):
        preprocess.Stats.load(str(tmp_path / "missing.npz"))


# ----------------------------------------------------------------------------- training pipeline

@pytest.fixture(scope="module")
def coordinate_batches(coordinates):
    """1,280 augmented views (no lighting) of the coordinate image minus half of it as the mean image: one
    epoch of 1,280 records that are all that image (labels: the index mod 64), one pipeline, as its 20
    (images, labels) batches (790 MB: not copied into one array). A view is half the coordinates, if the
    mean was cropped at the image's offset."""
    image = tf.constant(coordinates[None])
    source = sources.random_access(1280, lambda index: (tf.gather(image, tf.zeros_like(index)),
                                                        tf.cast(index % 64, tf.int32)), tf.identity, ["x"])
    pipeline = data.train_pipeline(source, 64, zero_stats(coordinates / 2), seed=3, pca_lighting=False)
    return [(images.numpy(), labels.numpy()) for images, labels in pipeline]


def test_train_batches_shape_dtype(coordinate_batches):
    assert [(images.shape, images.dtype) for images, _ in coordinate_batches] == [((64, 227, 227, 3), np.float32)] * 20
    labels = np.concatenate([labels for _, labels in coordinate_batches])
    assert labels.dtype == np.int32 and set(labels) == set(range(64))


def test_random_crops_cover_exactly_the_30x30_offsets(coordinates, coordinate_batches):
    half = coordinates / 2
    offsets, flips = [], []
    for image in (image for images, _ in coordinate_batches for image in images):
        flipped = bool(image[0, 0, 1] > image[0, -1, 1])  # Columns count down.
        view = image[:, ::-1] if flipped else image
        top, left = int(round(2 * view[0, 0, 0])), int(round(2 * view[0, 0, 1]))
        assert 0 <= top < 30 and 0 <= left < 30, (top, left)
        np.testing.assert_allclose(view, half[top:top + 227, left:left + 227], atol=1e-4)
        offsets.append((top, left)), flips.append(flipped)
    tops, lefts = zip(*offsets)
    assert set(tops) == set(range(30)) and set(lefts) == set(range(30))
    assert 15 < min(np.bincount(tops)) and max(np.bincount(tops)) < 80  # Uniform: ~43 each.
    assert 630 < len(set(offsets)) < 740  # Independent: ~683 distinct of the 900 pairs in 1,280 draws.
    assert 0.43 < np.mean(flips) < 0.57, np.mean(flips)


def test_lighting_moves_each_image_by_one_vector(coordinates):
    stats = preprocess.Stats.imagenet()
    source = constant_source([coordinates] * 8)
    plain, _ = epochs(source, 8, stats, 2, seed=4, pca_lighting=False)
    lit, _ = epochs(source, 8, stats, 2, seed=4, pca_lighting=True)
    shifts = (lit - plain).reshape(len(lit), -1, 3)
    np.testing.assert_allclose(shifts, shifts[:, :1].repeat(shifts.shape[1], 1), atol=1e-3)
    weights = shifts[:, 0] @ stats.eigenvectors / (255 * stats.eigenvalues)  # = alpha_i ~ N(0, 0.1)
    assert np.all(np.abs(weights) < 0.6) and 0.02 < weights.std() < 0.3, weights
    assert len(np.unique(np.round(shifts[:, 0], 3), axis=0)) == len(lit)  # Drawn once per image.


def test_uint8_augmentation_is_the_float_reference_bit_for_bit():
    """Cropped and flipped in uint8, then minus the mean's patch plus the lighting offset: the same float32
    values as the whole image minus the mean, cropped, lit and flipped (numpy, with the pipeline's draws)."""
    rng = np.random.default_rng(12)
    raw = rng.integers(0, 256, (8, 256, 256, 3), dtype=np.uint8)
    stats = preprocess.Stats.imagenet()
    stats.mean_image = rng.uniform(0, 255, (256, 256, 3)).astype(np.float32)  # Not symmetric: flips show.
    images, labels = epochs(constant_source(list(raw)), 8, stats, 2, seed=9)
    flips = 0
    for position, (image, index) in enumerate(zip(images, labels)):  # Labels are the images' indices.
        epoch_key = tf.constant([9, position // 8], tf.int64)
        key = tf.random.experimental.stateless_fold_in(epoch_key, tf.constant(index, tf.int64))
        keys = tf.random.experimental.stateless_split(key, 3)
        top, left = tf.random.stateless_uniform([2], keys[0], 0, 30, tf.int32).numpy()
        alphas = tf.random.stateless_normal([3], keys[1], stddev=0.1)
        shift = tf.linalg.matvec(tf.constant(stats.eigenvectors), alphas * stats.eigenvalues).numpy() * np.float32(255)
        expected = (raw[index].astype(np.float32) - stats.mean_image)[top:top + 227, left:left + 227] + shift
        flip = bool(tf.random.stateless_uniform([], keys[2]) < 0.5)
        np.testing.assert_array_equal(image, expected[:, ::-1] if flip else expected)
        flips += flip
    assert 0 < flips < 16


def test_load_images_flags_bad_records_in_place_across_chunks():
    """Bad payloads first, mid-chunk, a whole chunk of them and last: each keeps its place with ok False."""
    rng = np.random.default_rng(13)
    bad = {0, 5, 39} | set(range(sources.LOAD_CHUNK, 2 * sources.LOAD_CHUNK))
    good = {i: rng.integers(0, 256, (40, 60, 3), dtype=np.uint8) for i in range(40) if i not in bad}
    payloads = [encode(good[i]) if i in good else b"not an image" for i in range(40)]
    source = sources.random_access_source(np.array(payloads, object), np.arange(40), preprocess.decode, ["x"])
    loaded = list(sources.load_images(sources.indexed_records(source), source.load).as_numpy_iterator())
    assert [int(index) for index, *_ in loaded] == list(range(40))
    assert [int(label) for *_, label in loaded] == list(range(40))
    assert {int(index) for index, image, ok, label in loaded if not ok} == bad
    for index, image, ok, label in loaded:
        expected = preprocess.decode_and_resize(payloads[index]).numpy() if ok else np.zeros((256, 256, 3))
        np.testing.assert_array_equal(image, expected)


def test_a_side_of_256_is_cropped_as_the_rescale_does_it(coordinates):
    """Shorter side 256 (prepared files): the centre crop alone, equal to the kernel's output at scale 1."""
    rng = np.random.default_rng(14)
    for shape in [(256, 256), (256, 301), (300, 256)]:
        image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        np.testing.assert_array_equal(preprocess.resize_and_crop(image).numpy(),
                                      preprocess._rescaled_crop(tf.constant(image), 256).numpy())
    jpeg = tf.io.encode_jpeg(coordinates, quality=95)
    np.testing.assert_array_equal(preprocess.decode_and_resize(jpeg).numpy(), tf.io.decode_jpeg(jpeg).numpy())


def test_same_seed_same_batches_other_seed_differs():
    rng = np.random.default_rng(6)
    source = constant_source(list(rng.integers(0, 256, (40, 256, 256, 3), dtype=np.uint8)))
    stats = preprocess.Stats.imagenet()
    first = epochs(source, 16, stats, 3, seed=1, shuffle_buffer=16)
    again = epochs(source, 16, stats, 3, seed=1, shuffle_buffer=16)
    other = epochs(source, 16, stats, 1, seed=2, shuffle_buffer=16)  # Its first epoch already differs.
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[1][:32], other[1]) and not np.allclose(first[0][:32], other[0])
    # An epoch is 2 full batches of 16 of the 40 images: 32 distinct images, a new order each epoch.
    assert first[1].shape == (96,)
    for epoch in first[1].reshape(3, 32):
        assert len(set(epoch)) == 32
    assert not np.array_equal(first[1][:32], first[1][32:64])


@pytest.mark.slow
def test_cache_gives_the_same_batches_and_shards(tmp_path):
    rng = np.random.default_rng(7)
    source = constant_source(list(rng.integers(0, 256, (24, 256, 256, 3), dtype=np.uint8)))
    stats = preprocess.Stats.imagenet()
    plain = epochs(source, 8, stats, 2, seed=5, shuffle_buffer=8)
    for cache in ["memory", str(tmp_path / "cache")]:
        for _ in range(2):  # Second round reads the completed cache.
            cached = epochs(source, 8, stats, 2, seed=5, shuffle_buffer=8, cache=cache)
            np.testing.assert_array_equal(cached[0], plain[0])
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]  # Complete: renamed from .cache.tmp.
    # Two workers of two replicas each: worker w gets the w-th half of every global batch of 16,
    # as two per-replica batches of 4, the same images with the same augmentation.
    whole = collect(data.train_pipeline(source, 16, stats, seed=5))
    for worker in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker, num_replicas_in_sync=4)
        batches = list(data.train_pipeline(source, 16, stats, seed=5, input_context=context))
        assert [b[0].shape[0] for b in batches] == [4, 4]
        images, labels = collect(data.train_pipeline(source, 16, stats, seed=5, input_context=context))
        np.testing.assert_array_equal(labels, whole[1][8 * worker:8 * worker + 8])
        np.testing.assert_array_equal(images, whole[0][8 * worker:8 * worker + 8])


# ----------------------------------------------------------------------------- evaluation pipeline

def test_eval_pipeline_centre_and_ten_crop():
    rng = np.random.default_rng(8)
    raw = rng.integers(0, 256, (5, 256, 256, 3), dtype=np.uint8)
    mean = rng.uniform(0, 255, (256, 256, 3)).astype(np.float32)
    source = constant_source(list(raw))
    batches = list(data.eval_pipeline(source, 2, zero_stats(mean)))
    assert [b[0].shape for b in batches] == [(2, 227, 227, 3)] * 3  # The last one padded ...
    assert list(np.concatenate([b[1] for b in batches])) == [0, 1, 2, 3, 4, -1]  # ... with label -1.
    images = np.concatenate([b[0] for b in batches])[:5]
    np.testing.assert_allclose(images, (raw - mean)[:, 14:241, 14:241], atol=1e-4)
    ten = np.concatenate([b[0] for b in data.eval_pipeline(source, 3, zero_stats(mean), ten_crop=True)])
    assert ten.shape == (6, 10, 227, 227, 3) and ten.dtype == np.float32
    np.testing.assert_allclose(ten[4, 2], (raw[4] - mean)[:227, 29:], atol=1e-4)
    np.testing.assert_allclose(ten[4, 7], (raw[4] - mean)[:227, 29:][:, ::-1], atol=1e-4)


def test_validation_covers_the_split_once_for_any_number_of_workers_and_replicas():
    """7 images, global batch 4: two global batches, the last padded with one label -1, split over
    1 or 2 workers of 2 replicas each; every image is counted exactly once."""
    source = constant_source([np.zeros((256, 256, 3), np.uint8)] * 7)
    for workers in (1, 2):
        labels = []
        for worker in range(workers):
            context = tf.distribute.InputContext(num_input_pipelines=workers, input_pipeline_id=worker,
                                                 num_replicas_in_sync=2 * workers)
            batches = list(data.eval_pipeline(source, 4, zero_stats(), input_context=context))
            assert {b[0].shape[0] for b in batches} == {2 // workers}  # Every replica a full batch.
            labels += [int(y) for _, batch in batches for y in batch]
        assert sorted(y for y in labels if y >= 0) == list(range(7)) and labels.count(-1) == 1, workers


# ----------------------------------------------------------------------------- sources

def test_folder_source_skips_and_counts_corrupt_files(image_folder):
    root, good, corrupt = image_folder
    train = sources.load_source(str(root), "train", val_fraction=0.0)
    assert train.class_names == ["ant", "bee", "cat"] and train.num_examples == good + corrupt
    decoded, skipped = sources.decoded_images(train)
    assert skipped() == 0
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in decoded])
    assert len(images) == good and skipped() == corrupt
    assert all(x.shape == (256, 256, 3) and x.dtype == np.uint8 for x in images)
    assert sorted(np.bincount(labels)) == [4, 4, 4]
    list(decoded)  # A second pass does not count the same files again.
    assert skipped() == corrupt
    grey = [x for x, y in zip(images, labels) if y == 2 and np.array_equal(x[..., 0], x[..., 1])]
    assert grey and np.array_equal(grey[0][..., 0], grey[0][..., 2])  # cat/img1: a greyscale JPEG.


def test_eval_pipeline_of_a_folder_in_the_memory_cache(image_folder):
    """Decoded folder images, cached, pad the last batch as the files do (train --cache=memory)."""
    source = sources.load_source(str(image_folder[0]), "train", val_fraction=0.0)
    stats = preprocess.Stats.imagenet()
    plain, cached = (collect(data.eval_pipeline(source, 5, stats, cache=cache)) for cache in (None, "memory"))
    np.testing.assert_array_equal(cached[0], plain[0])
    np.testing.assert_array_equal(cached[1], plain[1])


def test_folder_hold_out_split_is_deterministic(image_folder, tmp_path):
    root, good, _ = image_folder
    digests = lambda split, seed: {x.tobytes() for x, _ in sources.decoded_images(sources.load_source(
        str(root), split, val_fraction=0.5, seed=seed))[0].as_numpy_iterator()}
    train, val = digests("train", 0), digests("val", 0)
    assert len(train) + len(val) == good and train.isdisjoint(val) and min(len(train), len(val)) > 0
    assert digests("validation", 7) == val  # The seed orders the files; it does not move them.
    for split in ["train", "val"]:  # Explicit train/ and val/ folders are used as they are.
        (tmp_path / split / "only").mkdir(parents=True)
        (tmp_path / split / "only" / "a.png").write_bytes(encode(np.zeros((30, 30, 3), np.uint8)))
    assert sources.load_source(str(tmp_path), "validation").num_examples == 1
    assert sources.load_source(str(tmp_path), "train").class_names == ["only"]


def test_validation_folders_are_labelled_by_the_training_split_s_names(tmp_path):
    for split, classes in [("train", ["ant", "bee", "cat"]), ("val", ["ant", "cat"])]:
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(2):
                (tmp_path / split / name / f"{i}.png").write_bytes(encode(np.zeros((16, 16, 3), np.uint8)))
    val = sources.load_source(str(tmp_path), "validation")
    assert val.class_names == ["ant", "bee", "cat"]
    assert sorted(int(label) for _, label in val.records) == [0, 0, 2, 2]  # Not [0, 0, 1, 1]: cat is 2.
    (tmp_path / "val" / "dog").mkdir()
    with pytest.raises(preprocess.DataError, match=r"val has classes its labels do not know: 'dog' \(the 3 known"):
        sources.load_source(str(tmp_path), "validation")
    with pytest.raises(preprocess.DataError, match="'ant', 'bee', 'cat'"):  # Another run's labels.
        sources.load_source(str(tmp_path), "train", class_names=["dog", "eel"])


def test_folder_listings_of_the_tools_and_of_training(tmp_path):
    """list_images (the tools): a folder's files (sorted) before its subfolders', hidden names skipped, labels the
    holding folder; training keeps only the files directly in class folders, in class order."""
    files = ["b/2.png", "b/1.jpg", "a/x.JPEG", "a/deep/y.png", "a/.hidden.png", ".git/z.png", "top.png",
             "a/notes.txt"]
    for name in files:
        (tmp_path / "root" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "root" / name).write_bytes(encode(np.zeros((16, 16, 3), np.uint8)))
    (tmp_path / "root" / "b" / "loop").symlink_to(tmp_path / "root")  # Read once, not forever.
    assert sources.list_images(str(tmp_path / "root")) == [
        ("top.png", "root"), ("a/x.JPEG", "a"), ("a/deep/y.png", "deep"), ("b/1.jpg", "b"), ("b/2.png", "b")]
    train = sources.load_source(str(tmp_path / "root"), "train", val_fraction=0.0)
    assert train.class_names == ["a", "b"]
    paths = sorted(p.decode().removeprefix(str(tmp_path / "root") + "/") for p, _ in train.records.as_numpy_iterator())
    assert paths == ["a/x.JPEG", "b/1.jpg", "b/2.png"]  # Not top.png, a/deep/y.png or hidden files.


def test_other_sources_are_labelled_by_name_too():
    names = list(reversed(synthetic.CLASS_NAMES))
    source = sources.load_source("synthetic", "validation", class_names=names)
    own = sources.load_source("synthetic", "validation")
    assert source.class_names == names
    assert [int(y) for _, y in source.records.take(10)] == [9 - int(y) for _, y in own.records.take(10)]
    with pytest.raises(preprocess.DataError, match=r"synthetic \(validation\) has classes its labels do not know"):
        sources.load_source("synthetic", "validation", class_names=names[1:])


def test_clear_errors(tmp_path, image_folder):
    (tmp_path / "empty").mkdir()
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(b"x")
    (tmp_path / "noimages" / "cls").mkdir(parents=True)
    cases = [(str(tmp_path / "empty"), "train", "empty"), (str(tmp_path / "flat"), "train", "no class subfolders"),
             (str(tmp_path / "noimages"), "train", "no image files"),
             (str(tmp_path / "missing"), "train", "missing"),
             ("no_such_dataset_xyz", "train", "no_such_dataset_xyz"),
             (str(image_folder[0]), "test", "test"), ("synthetic", "test", "test")]
    for dataset, split, words in cases:
        with pytest.raises(preprocess.DataError, match=words.split()[-1]) as error:
            sources.load_source(dataset, split)
        assert "\n" not in str(error.value) and (words in str(error.value) or dataset in str(error.value))


def test_synthetic_is_deterministic_balanced_and_varied():
    assert synthetic.SIZES == {"train": 2560, "validation": 512}
    source = sources.load_source("synthetic", "train")
    assert source.num_examples == 2560 and len(source.class_names) == 10
    first = list(sources.decoded_images(source)[0].take(20).as_numpy_iterator())
    again = list(sources.decoded_images(sources.load_source("synthetic", "train"))[0].take(20).as_numpy_iterator())
    val = list(sources.decoded_images(sources.load_source("synthetic", "val"))[0].take(20).as_numpy_iterator())
    assert all(np.array_equal(a[0], b[0]) for a, b in zip(first, again))
    assert not any(np.array_equal(a[0], b[0]) for a, b in zip(first, val))
    assert [y for _, y in first] == list(range(10)) * 2
    for image, _ in first:
        assert image.shape == (256, 256, 3) and image.dtype == np.uint8 and image.std() > 10
    # Same class, different instance: colours and positions differ.
    assert np.abs(first[0][0].astype(int) - first[10][0]).mean() > 20


def test_real_jpegs_from_the_shared_folder():
    imagenette = shared_data("imagenette2_224_subset")
    train, val = sources.load_source(str(imagenette), "train"), sources.load_source(str(imagenette), "validation")
    assert (train.num_examples, val.num_examples) == (3000, 1000)
    assert train.class_names == sorted(p.name for p in (imagenette / "train").iterdir())
    assert len(train.class_names) == 10
    batch, labels = next(iter(data.eval_pipeline(val, 50, preprocess.Stats.imagenet())))
    assert batch.shape == (50, 227, 227, 3) and -140 < float(tf.reduce_mean(batch)) < 140
    assert float(tf.math.reduce_std(batch)) > 20 and labels.dtype == tf.int32
    greyscale = sorted((imagenette / "train").rglob("*.JPEG"), key=lambda p: Image.open(p).mode != "L")[0]
    assert Image.open(greyscale).mode == "L"
    image = preprocess.decode_and_resize(tf.io.read_file(str(greyscale))).numpy()
    assert image.shape == (256, 256, 3) and np.array_equal(image[..., 0], image[..., 2])


# ----------------------------------------------------------------------------- statistics

def test_stats_match_numpy(image_folder):
    source = sources.load_source(str(image_folder[0]), "train", val_fraction=0.0)
    decoded, _ = sources.decoded_images(source)
    images = np.stack([x for x, _ in decoded.as_numpy_iterator()]).astype(np.float64)
    stats = stats_cli.compute_stats(decoded, source.num_examples, batch_size=5)
    np.testing.assert_allclose(stats.mean_image, images.mean(0), rtol=1e-5, atol=1e-3)
    pixels = images.reshape(-1, 3) / 255
    np.testing.assert_allclose(stats.channel_mean, pixels.mean(0) * 255, rtol=1e-5)
    covariance = np.cov(pixels, rowvar=False, bias=True)
    np.testing.assert_allclose(stats.eigenvalues, np.linalg.eigvalsh(covariance)[::-1], rtol=1e-4)
    vectors = stats.eigenvectors.astype(np.float64)
    np.testing.assert_allclose(vectors @ np.diag(stats.eigenvalues) @ vectors.T, covariance, atol=1e-6)


def test_stats_cli(tmp_path, image_folder):
    run = lambda *args: run_program("stats", *args, cwd=REPO)
    done = run(f"--dataset={image_folder[0]}", f"--output={tmp_path / 'out.npz'}", "--max_images=6")
    assert done.returncode == 0, done.stderr[-2000:]
    stats = preprocess.Stats.load(str(tmp_path / "out.npz"))
    assert stats.mean_image.shape == (256, 256, 3) and np.all(stats.eigenvalues[:-1] >= stats.eigenvalues[1:])
    failed = run(f"--dataset={tmp_path / 'nowhere'}", f"--output={tmp_path / 'x.npz'}")
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert f"error: dataset folder {tmp_path / 'nowhere'} does not exist" in failed.stderr


# ----------------------------------------------------------------------------- TFDS

def test_tfds_download_reaches_the_network(tmp_path, monkeypatch):
    """download_and_prepare gets as far as opening the URL (e.g. no ModuleNotFoundError for
    importlib_resources on the way); the network call itself is replaced, so the test is offline."""
    import requests
    from tensorflow_datasets.core.download import downloader
    urls = []

    def offline(url, **kwargs):
        urls.append(url)
        raise requests.exceptions.ConnectionError(f"offline test: {url}")

    monkeypatch.setattr(downloader, "_open_url", offline)
    builder = tfds.builder("tf_flowers", data_dir=str(tmp_path))
    with pytest.raises(requests.exceptions.ConnectionError, match="offline test"):
        builder.download_and_prepare()
    assert urls and urls[0].endswith("flower_photos.tgz")
    with pytest.raises(preprocess.DataError, match="'tf_flowers' is not prepared.*tfds build tf_flowers"):
        sources.load_source("tf_flowers", "train", data_dir=str(tmp_path / "unprepared"))


class AlexnetTestImages(tfds.core.GeneratorBasedBuilder):
    """A tiny TFDS dataset, prepared offline: 20 flat images, dark (label 0) or light (label 1)."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = tfds.features.FeaturesDict({"image": tfds.features.Image(shape=(None, None, 3)),
                                               "label": tfds.features.ClassLabel(names=["dark", "light"])})
        return tfds.core.DatasetInfo(builder=self, features=features, supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(20):
            yield i, {"image": np.full((40 + i, 60, 3), 220 if i % 2 else 30, np.uint8), "label": i % 2}


def test_tfds_source_decodes_and_holds_out_validation(tmp_path):
    tfds.builder("alexnet_test_images", data_dir=str(tmp_path)).download_and_prepare()
    train, val = (sources.load_source("alexnet_test_images", split, data_dir=str(tmp_path)) for split in ["train", "val"])
    assert train.class_names == ["dark", "light"] and (train.num_examples, val.num_examples) == (18, 2)
    for source in (train, val):
        for image, label in sources.decoded_images(source)[0].as_numpy_iterator():
            assert image.shape == (256, 256, 3) and image.dtype == np.uint8 and label.dtype == np.int32
            assert np.all(image == (220 if label else 30))
    assert sources.load_source("alexnet_test_images", "train[:50%]", data_dir=str(tmp_path)).num_examples == 10
    by_name = sources.load_source("alexnet_test_images", "val", data_dir=str(tmp_path), class_names=["light", "x", "dark"])
    for image, label in sources.decoded_images(by_name)[0].as_numpy_iterator():  # A run's labels: light 0, dark 2.
        assert label == {220: 0, 30: 2}[int(image[0, 0, 0])]
    with pytest.raises(preprocess.DataError, match=r"alexnet_test_images \(validation\) has classes its labels do "
                                             r"not know: 'dark' \(the 1 known: 'light'\)"):
        sources.load_source("alexnet_test_images", "val", data_dir=str(tmp_path), class_names=["light"])
    with pytest.raises(preprocess.DataError, match="'alexnet_test_images' has no split 'test'"):
        sources.load_source("alexnet_test_images", "test", data_dir=str(tmp_path))


FILL_CACHE = """import sys
from keras_alexnet import data, preprocess, sources
source = sources.load_source("synthetic", "validation")
next(iter(data.train_pipeline(source, 8, preprocess.Stats.imagenet(), steps=1, cache=sys.argv[1])))
print("filled")
"""


@pytest.mark.slow
def test_a_cache_file_killed_while_filling_is_filled_anew(tmp_path):
    """kill -9 during the fill leaves .cache.tmp; the next start fills it anew (tf.data's cache file
    refused to: 'cache lockfile already exists'), and its records are the split's images."""
    import signal
    import time
    cache = tmp_path / "cache"
    fill = subprocess.Popen([sys.executable, "-c", FILL_CACHE, str(cache)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (tmp_path / ".cache.tmp").exists() and time.time() < deadline and fill.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)
    fill.send_signal(signal.SIGKILL)
    fill.wait()
    assert fill.returncode == -signal.SIGKILL and (tmp_path / ".cache.tmp").exists() and not cache.exists()
    again = subprocess.run([sys.executable, "-c", FILL_CACHE, str(cache)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == "filled", again.stderr[-2000:]
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]
    records = np.load(cache, mmap_mode="r")
    image = synthetic.image_function("validation")
    for index in (0, 255, 511):
        np.testing.assert_array_equal(records[index]["image"], image(tf.constant(index, tf.int64)).numpy())
        assert records[index]["ok"] and records[index]["label"] == index % 10

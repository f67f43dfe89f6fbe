"""fc7 embeddings, nearest neighbours and conv1 filters (section 6.1, Figures 3 and 4): real files out."""
import json
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageFont

from conftest import NARROW, run_program, write_run
from keras_alexnet import embed, figures, filters, neighbors, preprocess
from keras_alexnet.errors import UserError
from keras_alexnet.export import export_saved_model
from keras_alexnet.model import build_alexnet, conv1_kernels

CLASSES = ("circles", "stripes", "noise")
LABELS = [f"class{i}" for i in range(10)]  # The model's 10 classes.
TENSORBOARD = Path(sys.executable).with_name("tensorboard")
FC7 = 4096 // 16  # fc7's units in the narrow net (conftest.NARROW; 4096 in the paper's).


def build_model():
    # Glorot weights: under the paper's N(0, 0.01) an untrained net's fc7 varies ~1% between images.
    return build_alexnet(10, seed=0, init="glorot", **NARROW)


@pytest.fixture(scope="module")
def model():
    return build_model()


@pytest.fixture(scope="module")
def saved_model(model, tmp_path_factory):
    return export_saved_model(model, LABELS, preprocess.Stats.imagenet(),
                              str(tmp_path_factory.mktemp("export")), 1)


def draw(kind, seed, size):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:size[1], :size[0]]
    colour = rng.integers(0, 256, 3)
    if kind == "circles":
        mask = np.sin(np.hypot(x - size[0] / 2, y - size[1] / 2) / (4 + seed)) > 0
    elif kind == "stripes":
        mask = (x // (6 + seed)) % 2 == 0
    else:
        mask = rng.random((size[1], size[0])) > 0.5
    return np.where(mask[..., None], colour, 255 - colour).astype(np.uint8)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """12 images in 3 class folders, JPEG and PNG of several sizes, and one file that is no image."""
    root = tmp_path_factory.mktemp("images")
    for c, kind in enumerate(CLASSES):
        (root / kind).mkdir()
        for i in range(4):
            image = Image.fromarray(draw(kind, 4 * c + i, (300 + 20 * i, 240 + 30 * c)))
            image.save(root / kind / f"{kind}{i}.{'png' if i % 2 else 'jpg'}")
    (root / "noise" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "noise" / "notes.txt").write_text("not an image either, and not listed")
    return root


@pytest.fixture(scope="module")
def embedded(saved_model, image_folder, tmp_path_factory):
    logdir = tmp_path_factory.mktemp("embeddings")
    rows, skipped = embed.run(saved_model, str(logdir), images=str(image_folder), batch_size=5)
    return logdir, rows, skipped


def read_metadata(logdir):
    lines = (logdir / embed.METADATA).read_text().splitlines()
    return lines[0], [line.split("\t") for line in lines[1:]]


def checkpointed_fc7(logdir):
    return tf.train.load_checkpoint(tf.train.latest_checkpoint(str(logdir))).get_tensor(embed.TENSOR_NAME)


def test_embed_writes_aligned_rows_metadata_and_sprite(embedded, image_folder, saved_model):
    logdir, rows, skipped = embedded
    assert (rows, skipped) == (12, 1)
    header, metadata = read_metadata(logdir)
    assert header == "file\tlabel"
    files = sorted(f"{k}/{p.name}" for k in CLASSES for p in (image_folder / k).iterdir()
                   if p.suffix != ".txt" and p.name != "broken.jpg")
    assert [m[0] for m in metadata] == files
    assert [m[1] for m in metadata] == [f.split("/")[0] for f in files]
    fc7 = checkpointed_fc7(logdir)
    assert fc7.shape == (12, FC7) and fc7.dtype == np.float32
    np.testing.assert_array_equal(np.load(logdir / embed.FC7), fc7)  # fc7.npy: the same rows, for numpy.
    # Row i is file i: the export's own decode path (features_images) gives the same vectors.
    encoded = tf.constant([(image_folder / f).read_bytes() for f in files])
    direct = tf.saved_model.load(saved_model).signatures["features_images"](image_bytes=encoded)["fc7"]
    np.testing.assert_allclose(fc7, direct.numpy(), rtol=1e-4, atol=1e-4)
    # And the `features` signature on the centre crops of the same images, decoded here.
    crops = tf.stack([preprocess.center_crop(preprocess.decode_and_resize((image_folder / f).read_bytes())) for f in files])
    features = tf.saved_model.load(saved_model).signatures["features"](images=tf.cast(crops, tf.float32))["fc7"]
    np.testing.assert_allclose(fc7, features.numpy(), rtol=1e-5, atol=1e-5)
    assert np.linalg.norm(fc7[0] - fc7[-1]) > 1e-3  # Different images, different vectors.
    assert Image.open(logdir / embed.SPRITE).size == (4 * 64, 4 * 64)  # ceil(sqrt(12)) = 4 a side.
    config = (logdir / "projector_config.pbtxt").read_text()
    assert embed.TENSOR_NAME in config and "single_image_dim: 64" in config
    assert not [p for p in os.listdir(logdir) if p.endswith(".raw")]


def test_sprite_thumbnails_shrink_to_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(embed, "MAX_SPRITE", 256)
    thumbs = np.zeros((30, embed.THUMB, embed.THUMB, 3), np.uint8)
    thumbs[7] = 200
    side = embed.write_sprite(tmp_path / "s.png", thumbs)
    assert side == 256 // 6  # ceil(sqrt(30)) = 6 tiles a side.
    sprite = np.asarray(Image.open(tmp_path / "s.png"))
    assert sprite.shape == (6 * side, 6 * side, 3)
    assert (sprite[side:2 * side, side:2 * side] == 200).all() and sprite[:side].max() == 0


def test_embed_max_images_takes_the_first_in_sorted_order(saved_model, image_folder, tmp_path):
    rows, skipped = embed.run(saved_model, str(tmp_path), images=str(image_folder), max_images=5)
    assert (rows, skipped) == (5, 1)  # noise/broken.jpg sorts before noise0.jpg.
    _, metadata = read_metadata(tmp_path)
    assert [m[0] for m in metadata] == ["circles/circles0.jpg", "circles/circles1.png", "circles/circles2.jpg",
                                        "circles/circles3.png", "noise/noise0.jpg"]
    assert checkpointed_fc7(tmp_path).shape == (5, FC7)
    assert Image.open(tmp_path / embed.SPRITE).size == (3 * 64, 3 * 64)


def test_embed_a_dataset_split(saved_model, tmp_path):
    rows, _ = embed.run(saved_model, str(tmp_path), dataset="synthetic", split="validation", max_images=3)
    _, metadata = read_metadata(tmp_path)
    assert rows == 3 and [m[0] for m in metadata] == ["validation/000000", "validation/000001",
                                                       "validation/000002"]
    assert checkpointed_fc7(tmp_path).shape == (3, FC7)


def test_embed_real_photos_flat_folder(saved_model, photos, tmp_path):
    folder = Path(photos[0]).parent
    rows, skipped = embed.run(saved_model, str(tmp_path), images=str(folder))
    _, metadata = read_metadata(tmp_path)
    assert (rows, skipped) == (len(photos), 0)
    assert metadata == [[Path(p).name, "skimage_photos"] for p in photos]


@pytest.mark.parametrize("kwargs, message", [
    ({"images": "/no/such/folder"}, "is not a directory"),
    ({}, "exactly one of --images and --dataset"),
    ({"images": ".", "max_images": 0}, "--max_images must be positive"),
])
def test_embed_bad_input(saved_model, tmp_path, kwargs, message):
    with pytest.raises((UserError, OSError), match=message):
        embed.run(saved_model, str(tmp_path), **kwargs)


def test_neighbours_from_an_embed_logdir(embedded, saved_model, image_folder, tmp_path):
    logdir, _, _ = embedded
    queries = tmp_path / "queries"
    queries.mkdir()
    for name in ("circles/circles1.png", "stripes/stripes2.jpg", "noise/noise3.png"):
        (queries / name.replace("/", "_")).write_bytes((image_folder / name).read_bytes())
    png, tsv = neighbors.run(saved_model, str(logdir), str(queries), k=4, output_dir=str(tmp_path / "out"))
    lines = Path(tsv).read_text().splitlines()
    assert lines[0] == "query\trank\tfile\tlabel\tdistance" and len(lines) == 1 + 3 * 4
    table = [line.split("\t") for line in lines[1:]]
    for query, first in zip(sorted(os.listdir(queries)), table[::4]):
        assert first[0] == query and first[1] == "1"
        assert first[2] == query.replace("_", "/", 1) and first[3] == query.split("_")[0]
        assert float(first[4]) < 1e-3  # Its own fc7 row, found without recomputing the index.
    for start in range(0, 12, 4):
        distances = [float(row[4]) for row in table[start:start + 4]]
        assert distances == sorted(distances) and distances[1] > 1e-2
    assert Image.open(png).size == grid_size(3, 4)


def test_a_failed_embed_leaves_the_existing_log_dir_intact(saved_model, image_folder, tmp_path):
    logdir = tmp_path / "logs"
    embed.run(saved_model, str(logdir), images=str(image_folder), max_images=2)
    before = {p.name: p.read_bytes() for p in logdir.iterdir()}
    (tmp_path / "corrupt").mkdir()
    for name in ("a.jpg", "b.png"):
        (tmp_path / "corrupt" / name).write_bytes(b"not an image")
    with pytest.raises(preprocess.DataError, match="no image could be embedded"):
        embed.run(saved_model, str(logdir), images=str(tmp_path / "corrupt"))
    assert {p.name: p.read_bytes() for p in logdir.iterdir()} == before
    assert len(read_metadata(logdir)[1]) == 2 and sorted(os.listdir(tmp_path)) == ["corrupt", "logs"]


def test_embed_never_replaces_a_folder_that_is_no_embed_log_dir(saved_model, image_folder, tmp_path):
    (tmp_path / "events.out.tfevents.1").write_text("a training run's log")
    with pytest.raises(ValueError, match="holds files but is no embed log dir"):
        embed.run(saved_model, str(tmp_path), images=str(image_folder), max_images=1)
    assert os.listdir(tmp_path) == ["events.out.tfevents.1"]


def test_neighbours_refuse_an_index_made_by_another_export(embedded, model, saved_model, image_folder, tmp_path):
    logdir, _, _ = embedded
    assert json.loads((logdir / embed.EXPORT).read_text()) == {
        "saved_model": os.path.abspath(saved_model), "fingerprint": embed.fingerprint(saved_model)}
    stats = preprocess.Stats.imagenet()
    stats.mean_image = stats.mean_image + 1  # Another export: other outputs for the same images.
    other = export_saved_model(model, LABELS, stats, str(tmp_path / "other"), 2)
    assert embed.fingerprint(other) != embed.fingerprint(saved_model)
    with pytest.raises(ValueError, match=f"embedded by {saved_model} .*not by --saved_model {other}"):
        neighbors.run(other, str(logdir), str(image_folder / "stripes"), output_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_neighbours_from_an_image_folder_match_the_logdir(embedded, saved_model, image_folder, tmp_path):
    logdir, _, _ = embedded
    fc7 = checkpointed_fc7(logdir)
    queries = image_folder / "stripes"
    png, tsv = neighbors.run(saved_model, str(image_folder), str(queries), k=12, output_dir=str(tmp_path))
    table = [line.split("\t") for line in Path(tsv).read_text().splitlines()[1:]]
    assert len(table) == 4 * 12
    _, metadata = read_metadata(logdir)
    row_of = {m[0]: i for i, m in enumerate(metadata)}
    query = fc7[row_of["stripes/stripes0.jpg"]]
    expected = sorted(np.linalg.norm(fc7 - query, axis=1))
    np.testing.assert_allclose([float(r[4]) for r in table[:12]], expected, rtol=1e-3, atol=1e-3)
    assert table[0][2] == "stripes/stripes0.jpg"
    assert Image.open(png).size == grid_size(4, 12)


def grid_size(queries, k, side=64):
    """(width, height) of neighbors.png: the query column set apart, two caption lines under each row."""
    return (side + neighbors.QUERY_GAP + k * side + (k - 1) * neighbors.GAP,
            queries * (side + 2 * CAPTION_LINE) + (queries - 1) * neighbors.GAP)


CAPTION_LINE = ImageFont.load_default().getbbox("Ag")[3] + 2


def test_neighbours_png_reads_like_figure_4():
    """The query column stands apart; each tile has its caption lines in black below it."""
    rng = np.random.default_rng(0)
    index_thumbs = rng.integers(0, 255, (5, 64, 64, 3), np.uint8)
    rows = np.array([[3, 1, 4], [0, 2, 1]])
    captions = [[neighbors.query_caption("queries/cat.jpg")] +
                [neighbors.neighbour_caption(f"n0244{i:04d} label {i}", 10.0 * i) for i in row] for row in rows]
    assert captions[0][:2] == [["query", "cat.jpg"], ["label 3", "d = 30"]]  # Without the WordNet id.
    grid = neighbors.grid_image(index_thumbs[:2], index_thumbs, rows, captions)
    assert grid.shape[1::-1] == grid_size(2, 3)
    assert (grid[:, 64:64 + neighbors.QUERY_GAP] == 255).all()  # The gap that sets the query apart.
    for r, row in enumerate(rows):
        top = r * (64 + 2 * CAPTION_LINE + neighbors.GAP)
        for c, i in enumerate(row):
            x = 64 + neighbors.QUERY_GAP + c * (64 + neighbors.GAP)
            np.testing.assert_array_equal(grid[top:top + 64, x:x + 64], index_thumbs[i])
            caption = grid[top + 64:top + 64 + 2 * CAPTION_LINE, x:x + 64]
            assert (caption < 128).any() and (caption == 255).any()  # Black text on white.
    first, second = (grid[64:64 + CAPTION_LINE, x:x + 64]
                     for x in (64 + neighbors.QUERY_GAP + c * (64 + neighbors.GAP) for c in (0, 1)))
    assert not np.array_equal(first, second)  # Different labels, different captions.


def test_nearest_is_exact_euclidean():
    index = np.array([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0]], np.float32)
    rows, distances = neighbors.nearest(np.array([[3.0, 4.0], [0.2, 0.0]]), index, 2)
    assert rows.tolist() == [[1, 2], [0, 2]]
    np.testing.assert_allclose(distances, [[0, math.sqrt(20)], [0.2, 0.8]], atol=1e-12)


def test_filters_grid_puts_tower_b_below(tmp_path):
    model = build_alexnet(10, seed=0, init="glorot")  # The paper's 48 kernels a tower: 3 rows of 16.
    rng = np.random.default_rng(0)
    grey = np.repeat(rng.normal(size=(11, 11, 1, 48)), 3, axis=2)  # Colour-agnostic: R = G = B.
    red = np.zeros((11, 11, 3, 48))
    red[:, :, 0, :] = np.linspace(0, 1, 11)[None, :, None]  # Pure red, brightening left to right.
    model.get_layer("conv1_a").layer.kernel.assign(grey)
    model.get_layer("conv1_b").layer.kernel.assign(red)
    write_run(tmp_path / "run", model, {"num_classes": 10, "seed": 0, "init": "glorot"}, LABELS)
    saturations = filters.run(str(tmp_path / "filters.png"), model_dir=str(tmp_path / "run"))
    assert saturations["A"] == pytest.approx(0, abs=1e-6)
    assert saturations["B"] == pytest.approx(0.5)
    grid = np.asarray(Image.open(tmp_path / "filters.png"))
    side = 11 * 4 + 1
    assert grid.shape == (6 * side - 1, 16 * side - 1, 3)  # 3 rows of 16 a tower.
    top, bottom = grid[:3 * side - 1], grid[3 * side:]
    tiles = [bottom[r * side:r * side + 44, c * side:c * side + 44] for r in range(3) for c in range(16)]
    ramp = np.repeat(np.round(np.linspace(0, 255, 11)), 4)
    for tile in tiles:
        assert (tile[..., 1:] == 0).all()
        np.testing.assert_allclose(tile[0, :, 0], ramp, atol=1)  # float32 kernel, rounded to 8 bits.
    assert (top[..., 0] == top[..., 1]).all() and (top[..., 1] == top[..., 2]).all()
    assert (grid[3 * side - 1] == 255).all() and (grid[:, side - 1] == 255).all()  # Gap pixels.


def test_grid_lays_tiles_out_row_major_with_gaps():
    tiles = [np.full((2, 3, 3), i, np.uint8) for i in range(5)]
    image = figures.grid(tiles, 2, gap=1)
    assert image.shape == (3 * 3 - 1, 2 * 4 - 1, 3)
    for i in range(5):
        row, col = divmod(i, 2)
        assert (image[row * 3:row * 3 + 2, col * 4:col * 4 + 3] == i).all()
    assert (image[2] == 255).all() and (image[:, 3] == 255).all() and (image[6:, 4:] == 255).all()
    # A tower whose last row is not full: tower B still starts on a row of its own.
    kernels = [np.full((11, 11, 3, 48), 0.0), np.full((11, 11, 3, 48), 0.0)]
    kernels[1][0, 0, 0] = 1.0  # Each B kernel: one red corner pixel, the rest black.
    grid = figures.kernel_grid(kernels, columns=10, scale=1)
    assert grid.shape == (10 * 12 - 1, 10 * 12 - 1, 3)  # 5 rows of 10 a tower.
    assert (grid[4 * 12:5 * 12 - 1, 8 * 12:] == 255).all()  # Tower A's two empty places are blank.
    assert tuple(grid[5 * 12, 0]) == (255, 0, 0) and tuple(grid[4 * 12, 0]) == (0, 0, 0)


def test_filters_from_a_saved_model(saved_model, tmp_path):
    saturations = filters.run(str(tmp_path / "f.png"), saved_model=saved_model, columns=8, scale=2)
    expected = conv1_kernels(build_model())
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "f.png")), figures.kernel_grid(expected, 8, 2))
    assert saturations == {"A": pytest.approx(filters.saturation(expected[0])),
                           "B": pytest.approx(filters.saturation(expected[1]))}
    with pytest.raises(ValueError, match="exactly one of --model_dir and --saved_model"):
        filters.run(str(tmp_path / "f.png"))


def test_filters_from_a_one_tower_export(tmp_path):
    """The one-tower ablation model's export has one [11, 11, 3, 96] conv1 kernel (6 in the narrow net), found
    by name."""
    model = build_alexnet(10, towers=1, seed=2, **NARROW)
    path = export_saved_model(model, [f"class{i}" for i in range(10)], preprocess.Stats.imagenet(), str(tmp_path), 1)
    saturations = filters.run(str(tmp_path / "f.png"), saved_model=path, columns=16, scale=1)
    expected = conv1_kernels(model)
    assert [k.shape for k in expected] == [(11, 11, 3, 96 // 16)]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "f.png")), figures.kernel_grid(expected, 16, 1))
    assert saturations == {"A": pytest.approx(filters.saturation(expected[0]))}


def get(url):
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


@pytest.mark.slow
@pytest.mark.skipif(not TENSORBOARD.exists(), reason="no tensorboard executable beside python")
def test_tensorboard_serves_the_projector(embedded, free_port):
    logdir, _, _ = embedded
    port = free_port()
    base = f"http://127.0.0.1:{port}/data/plugin/projector"
    server = subprocess.Popen([str(TENSORBOARD), "--logdir", str(logdir), "--host", "127.0.0.1",
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                runs = json.loads(get(f"{base}/runs"))
                break
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None, server.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, "tensorboard did not answer within 90 s"
                time.sleep(1)
        assert runs == ["."]
        info = json.loads(get(f"{base}/info?run=."))
        [embedding] = [e for e in info["embeddings"] if e["tensorName"] == embed.TENSOR_NAME]
        assert [int(d) for d in embedding["tensorShape"]] == [12, FC7]
        assert [int(d) for d in embedding["sprite"]["singleImageDim"]] == [64, 64]
        name = urllib.parse.quote(embed.TENSOR_NAME)
        tensor = np.frombuffer(get(f"{base}/tensor?run=.&name={name}"), np.float32).reshape(12, FC7)
        np.testing.assert_array_equal(tensor, checkpointed_fc7(logdir))
        metadata = get(f"{base}/metadata?run=.&name={name}").decode().splitlines()
        assert metadata == (logdir / embed.METADATA).read_text().splitlines()
        sprite = get(f"{base}/sprite_image?run=.&name={name}")
        assert sprite == (logdir / embed.SPRITE).read_bytes()
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_cli_bad_input_is_one_line(tmp_path):
    result = run_program("neighbors", "--saved_model", tmp_path, "--index", tmp_path, "--queries", tmp_path)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")

"""SavedModel export: TF Serving layout, signatures, saved_model_cli, self-containment, size, errors."""
import dataclasses
import io
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow.core.protobuf import saved_model_pb2

from conftest import NARROW, run_cli, run_program, write_run
from keras_alexnet import checkpoint, data, distribute, export, make_npy, preprocess, sources
from keras_alexnet.model import INPUT_SHAPE, build_alexnet, feature_model, tower_variables

SAVED_MODEL_CLI = str(Path(sys.executable).with_name("saved_model_cli"))
CLASSES = [f"class {i}" for i in range(10)]
MODEL = {"num_classes": 10, "seed": 3, "init": "glorot"}  # Glorot: distinct outputs per image. The paper's net:
# its size (stored once), fc7's 4096 in the signatures; the tests of behaviour alone build a narrow one. The
# tests of the paper's net's export (exported, loaded, keras_model) are in the slow tier.
STEP = 7


def relative_difference(actual, expected):
    return np.max(np.abs(actual - expected)) / np.max(np.abs(expected))


@pytest.fixture(scope="module")
def stats():
    """ImageNet figures with a mean image that varies in space, so that a wrong crop of it shows."""
    ramp = np.linspace(-20, 20, 256, dtype=np.float32)
    imagenet = preprocess.Stats.imagenet()
    return dataclasses.replace(imagenet, mean_image=imagenet.mean_image + ramp[:, None, None] - ramp[None, :, None])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, stats):
    """A training run directory at step 7, as a training run leaves it."""
    model_dir = tmp_path_factory.mktemp("run")
    model = build_alexnet(**MODEL)
    return write_run(model_dir, model, MODEL, CLASSES, step=STEP, stats=stats), model


@pytest.fixture(scope="module")
def narrow_run_dir(tmp_path_factory, stats):
    """run_dir of a narrow net."""
    model_dir = tmp_path_factory.mktemp("narrow_run")
    model = build_alexnet(**MODEL, **NARROW)
    return write_run(model_dir, model, {**MODEL, **NARROW}, CLASSES, step=STEP, stats=stats), model


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    """The one export of the session, through the command line."""
    model_dir, _ = run_dir
    export_dir = tmp_path_factory.mktemp("export") / "alexnet"
    result = run_program("export", f"--model_dir={model_dir}", f"--export_dir={export_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"to {export_dir / str(STEP)}" in result.stdout
    return export_dir / str(STEP)


@pytest.fixture(scope="module")
def keras_model(run_dir):
    return run_dir[1]


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """A JPEG and a greyscale PNG of our own, not square, so that resizing and cropping matter."""
    folder = tmp_path_factory.mktemp("images")
    y, x = np.mgrid[:240, :320]
    rgb = np.stack([x % 256, y % 256, (x * y) % 256], -1).astype(np.uint8)
    Image.fromarray(rgb).save(folder / "pattern.jpg", quality=90)
    Image.fromarray(((x + 2 * y) % 256).astype(np.uint8)[:300, :200]).save(folder / "grey.png")
    return [str(folder / "pattern.jpg"), str(folder / "grey.png")]


def mean_crop(stats):
    return preprocess.center_crop(tf.constant(stats.mean_image)).numpy()


def keras_outputs(model, stats, files):
    """What the Keras model gives for the centre crops of `files`: (probabilities, fc7)."""
    crops = np.stack([preprocess.center_crop(preprocess.decode_and_resize(Path(f).read_bytes())) for f in files])
    inputs = crops.astype(np.float32) - mean_crop(stats)
    return model(inputs, training=False).numpy(), feature_model(model)(inputs, training=False).numpy()


@pytest.mark.slow
def test_export_has_tf_serving_layout_with_labels_asset(exported):
    assert sorted(os.listdir(exported.parent)) == [str(STEP)]  # No staging directory left behind.
    assert {"saved_model.pb", "variables", "assets", "assets.extra"} <= set(os.listdir(exported))
    assert checkpoint.read_labels(str(exported / "assets" / checkpoint.LABELS)) == CLASSES


@pytest.mark.slow
def test_weights_are_stored_once(exported, keras_model):
    stored = sum(f.stat().st_size for f in (exported / "variables").iterdir())
    mean_image = 256 * 256 * 3 * 4
    assert 4 * keras_model.count_params() < stored <= 1.02 * 4 * keras_model.count_params() + mean_image + 2**16


@pytest.mark.slow
def test_saved_model_cli_show_lists_every_signature(exported):
    result = subprocess.run([SAVED_MODEL_CLI, "show", "--dir", str(exported), "--all"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    blocks = dict(re.findall(r"signature_def\['(\w+)'\]:\n(.*?)Method name", result.stdout, re.S))
    assert set(export.SIGNATURES) <= set(blocks)
    for name in export.SIGNATURES:
        kind = "image_bytes" if name.endswith("_images") else "images"
        assert re.search(rf"inputs\['{kind}'\].*?dtype: DT_{'STRING' if kind == 'image_bytes' else 'FLOAT'}",
                         blocks[name], re.S)
        expected = ({"fc7": ("FLOAT", "(-1, 4096)")} if name.startswith("features") else
                    {"probabilities": ("FLOAT", "(-1, 10)"), "top5_classes": ("INT32", "(-1, 5)"),
                     "top5_labels": ("STRING", "(-1, 5)")})
        outputs = {key: (dtype, shape) for key, dtype, shape in re.findall(
            r"outputs\['(\w+)'\] tensor_info:\n\s+dtype: DT_(\w+)\n\s+shape: (.*)", blocks[name])}
        assert outputs == expected, (name, blocks[name])


@pytest.mark.slow
@pytest.mark.parametrize("signature", ["serving_default", "features", "predict_images"])
def test_saved_model_cli_run_matches_keras(signature, exported, keras_model, stats, image_files, tmp_path):
    x = tmp_path / "x.npy"
    make_npy.make_npy(image_files, str(x), encoded=signature == "predict_images")
    key = "image_bytes" if signature == "predict_images" else "images"
    result = subprocess.run([SAVED_MODEL_CLI, "run", "--dir", str(exported), "--tag_set", "serve",
                             "--signature_def", signature, "--inputs", f"{key}={x}", "--outdir", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    probabilities, fc7 = keras_outputs(keras_model, stats, image_files)
    if signature == "features":
        assert relative_difference(np.load(tmp_path / "fc7.npy"), fc7) < 1e-5
        return
    assert relative_difference(np.load(tmp_path / "probabilities.npy"), probabilities) < 1e-5
    top5 = np.argsort(-probabilities, axis=1)[:, :5]
    np.testing.assert_array_equal(np.load(tmp_path / "top5_classes.npy"), top5)
    labels = np.load(tmp_path / "top5_labels.npy", allow_pickle=True)
    assert [[label.decode() for label in row] for row in labels] == [[CLASSES[i] for i in row] for row in top5]
    assert "Result for output key top5_labels" in result.stdout


LOADER = """
import sys
sys.modules["keras_alexnet"] = None  # Installed editable: block it, the SavedModel must not need it.
import numpy as np, tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
pixels, encoded = np.load(sys.argv[2]), np.load(sys.argv[3], allow_pickle=True)
outputs = {}
for name in model.signatures:
    inputs = {"image_bytes": tf.constant(list(encoded))} if name.endswith("_images") else {"images": pixels}
    outputs.update({f"{name}/{k}": v.numpy() for k, v in model.signatures[name](**inputs).items()})
np.savez(sys.argv[4], **outputs)
"""


@pytest.mark.slow
def test_loads_and_matches_keras_without_keras_alexnet(exported, keras_model, stats, image_files, photos, tmp_path):
    files = image_files + photos
    make_npy.make_npy(files, str(tmp_path / "pixels.npy"))
    make_npy.make_npy(files, str(tmp_path / "encoded.npy"), encoded=True)
    result = run_cli("-c", LOADER, str(exported), str(tmp_path / "pixels.npy"), str(tmp_path / "encoded.npy"),
                     str(tmp_path / "out.npz"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "custom gradient" not in result.stderr.lower()
    outputs = np.load(tmp_path / "out.npz", allow_pickle=True)  # top5_labels: bytes objects.
    probabilities, fc7 = keras_outputs(keras_model, stats, files)
    for source in ("serving_default", "predict_images"):
        assert relative_difference(outputs[f"{source}/probabilities"], probabilities) < 1e-5
        assert outputs[f"{source}/top5_classes"].dtype == np.int32
        top5 = np.argsort(-outputs[f"{source}/probabilities"], axis=1)[:, :5]  # Most probable first.
        np.testing.assert_array_equal(outputs[f"{source}/top5_classes"], top5)
        assert outputs[f"{source}/top5_labels"].tolist() == [[CLASSES[i].encode() for i in row] for row in top5]
    for source in ("features", "features_images"):
        assert relative_difference(outputs[f"{source}/fc7"], fc7) < 1e-5
        assert fc7.min() >= 0  # Post-ReLU.


@pytest.fixture(scope="module")
def loaded(exported):
    return tf.saved_model.load(str(exported)).signatures


@pytest.mark.slow
@pytest.mark.parametrize("shape, expected", [
    ((227, 227, 3), r"images must be float32 \[N, 227, 227, 3\].*\[227 227 3\]"),
    ((1, 224, 224, 3), r"images must be float32 \[N, 227, 227, 3\].*\[1 224 224 3\]"),
    ((2, 227, 227, 4), r"images must be float32 \[N, 227, 227, 3\].*\[2 227 227 4\]"),
])
def test_bad_images_say_what_is_expected(loaded, shape, expected):
    for name in ("serving_default", "features"):
        with pytest.raises(tf.errors.InvalidArgumentError, match=expected):
            loaded[name](images=tf.zeros(shape))


@pytest.mark.slow
def test_bad_image_bytes_say_what_is_expected(loaded, image_files):
    encoded = Path(image_files[0]).read_bytes()
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"image_bytes must be a string vector \[N\]"):
        loaded["predict_images"](image_bytes=tf.constant(encoded))
    with pytest.raises(tf.errors.InvalidArgumentError, match="not a JPEG, PNG, GIF, BMP or WebP image"):
        loaded["features_images"](image_bytes=tf.constant([encoded, b"not an image"]))


@pytest.mark.slow
def test_empty_batch_gives_empty_outputs(loaded):
    shapes = {"probabilities": (0, 10), "top5_classes": (0, 5), "top5_labels": (0, 5), "fc7": (0, 4096)}
    for name in export.SIGNATURES:
        inputs = ({"image_bytes": tf.constant([], tf.string)} if name.endswith("_images")
                  else {"images": tf.zeros((0, 227, 227, 3))})
        outputs = loaded[name](**inputs)
        assert {k: tuple(v.shape) for k, v in outputs.items()} == {k: shapes[k] for k in outputs}


@pytest.mark.slow
def test_ten_crop_export_matches_evaluates_ten_crop(keras_model, stats, image_files):
    """Each view loses its own (mirrored) patch of the mean image, as in evaluate's 10-crop test."""
    module = export.serving_module(keras_model, CLASSES, stats, ten_crop=True)
    assert bool(module.ten_crop.numpy())
    encoded = [Path(f).read_bytes() for f in image_files]
    decoded = tf.stack([preprocess.decode_and_resize(e) for e in encoded])
    source = sources.array_source(decoded, np.zeros(len(encoded)), CLASSES)
    views, _ = next(iter(data.eval_pipeline(source, len(encoded), stats, ten_crop=True)))
    views = tf.reshape(views, (-1, *INPUT_SHAPE))

    def averaged(net, inputs):
        return net(inputs, training=False).numpy().reshape(len(encoded), 10, -1).mean(1)

    expected = averaged(keras_model, views)
    got = module.predict_images(image_bytes=tf.constant(encoded))["probabilities"].numpy()
    assert relative_difference(got, expected) < 1e-5
    fc7 = module.features_images(image_bytes=tf.constant(encoded))["fc7"].numpy()
    assert relative_difference(fc7, averaged(feature_model(keras_model), views)) < 1e-5
    # The mean's centre patch taken from every view (instead of each view's own patch) differs on this mean image.
    views_of_pixels = tf.concat([preprocess.ten_crop(tf.cast(image, tf.float32)) for image in decoded], 0)
    assert relative_difference(averaged(keras_model, views_of_pixels - mean_crop(stats)), expected) > 1e-3


@pytest.mark.slow
def test_warmup_requests_parse_as_tf_serving_prediction_logs(exported, loaded):
    apis = pytest.importorskip("tensorflow_serving.apis.prediction_log_pb2",
                               reason="tensorflow-serving-api is not installed (the dev extra)")
    records = list(tf.data.TFRecordDataset(str(exported / "assets.extra" / "tf_serving_warmup_requests")))
    assert len(records) == 2
    for size, record in zip((1, 2), records):
        log = apis.PredictionLog.FromString(record.numpy())
        request = log.predict_log.request
        assert log.WhichOneof("log_type") == "predict_log" and request.model_spec.signature_name == "predict_images"
        assert request.model_spec.name == "alexnet" and list(request.inputs) == ["image_bytes"]
        images = tf.make_ndarray(request.inputs["image_bytes"])
        assert images.shape == (size,) and images.dtype == object
        outputs = loaded["predict_images"](image_bytes=tf.constant(images))
        assert outputs["probabilities"].shape == (size, 10)


def test_fewer_than_five_classes_give_that_many_top_classes(stats):
    module = export.serving_module(build_alexnet(3, seed=0, init="glorot", **NARROW), ["a", "b", "c"], stats)
    images = tf.constant(np.random.default_rng(0).uniform(0, 255, (2, 227, 227, 3)), tf.float32)
    outputs = module.serving_default(images=images)
    assert outputs["top5_classes"].shape == (2, 3) and outputs["top5_labels"].shape == (2, 3)
    np.testing.assert_array_equal(outputs["top5_classes"], np.argsort(-outputs["probabilities"].numpy(), axis=1))
    with pytest.raises(ValueError, match="2 class names for a model of 3 classes"):
        export.serving_module(build_alexnet(3, seed=0, **NARROW), ["a", "b"], stats)


def test_export_function_writes_and_replaces_a_version(narrow_run_dir, stats, tmp_path):
    _, model = narrow_run_dir
    path = export.export_saved_model(model, CLASSES, stats, str(tmp_path), 3)
    assert path == str(tmp_path / "3")
    (tmp_path / "3" / "stale").write_text("from an older export")
    assert export.export_saved_model(model, CLASSES, stats, str(tmp_path), 3) == path
    assert sorted(os.listdir(tmp_path)) == ["3"] and not (tmp_path / "3" / "stale").exists()


def test_an_export_of_a_model_trained_on_two_towers_pins_no_device(stats, logical_cpus, tmp_path):
    """The trainer's model (plan (a): tower B on CPU:1) exports functions that name no device, which strict
    loaders refuse and which would split a server's every request across two GPUs; and it computes the model."""
    strategy, plan = distribute.make_strategy(2, logical_cpus[:2])
    with tower_variables(), strategy.scope():
        model = build_alexnet(**MODEL, tower_devices=plan, **NARROW)
    path = export.export_saved_model(model, CLASSES, stats, str(tmp_path), STEP)
    saved = saved_model_pb2.SavedModel.FromString((Path(path) / "saved_model.pb").read_bytes())
    functions = [f for f in saved.meta_graphs[0].graph_def.library.function  # TensorFlow's own checkpoint
                 if not re.search("_traced_(save|restore)_", f.signature.name)]   # I/O runs on a CPU: not ours.
    pins = [(f.signature.name, n.name, n.device) for f in functions for n in f.node_def if "/device:" in n.device]
    assert len(functions) > 10 and not pins, pins[:5]
    images = np.random.default_rng(2).uniform(0, 255, (2, *INPUT_SHAPE)).astype("float32")
    got = tf.saved_model.load(path).signatures["serving_default"](images=images)["probabilities"].numpy()
    want = model(images - mean_crop(stats), training=False).numpy()
    assert relative_difference(got, want) < 1e-6


def test_make_npy_command_line(image_files, tmp_path):
    out = tmp_path / "jpegs.npy"
    result = run_program("make_npy", "--bytes", f"--out={out}", *image_files)
    assert result.returncode == 0, result.stderr[-3000:]
    encoded = np.load(out, allow_pickle=True)
    assert encoded.dtype == object and list(encoded) == [Path(f).read_bytes() for f in image_files]
    make_npy.make_npy(image_files, str(tmp_path / "x.npy"))
    pixels = np.load(tmp_path / "x.npy")
    assert pixels.dtype == np.float32 and pixels.shape == (2, 227, 227, 3)


@pytest.mark.parametrize("case", ["missing run", "no checkpoint", "missing image", "not an image"])
def test_bad_command_line_input_fails_in_one_line(case, tmp_path, stats):
    if case == "missing run":
        args = [f"--model_dir={tmp_path / 'nowhere'}", f"--export_dir={tmp_path / 'export'}"]
    elif case == "no checkpoint":
        checkpoint.write_run_files(str(tmp_path / "run"), {"model": MODEL}, CLASSES, stats)
        args = [f"--model_dir={tmp_path / 'run'}", f"--export_dir={tmp_path / 'export'}"]
    else:
        (tmp_path / "notes.jpg").write_text("not an image")
        image = tmp_path / ("missing.jpg" if case == "missing image" else "notes.jpg")
        args = ["--bytes", f"--out={tmp_path / 'x.npy'}", str(image)]
    result = run_program("make_npy" if "image" in case else "export", *args)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert {"missing run": "not a training run", "no checkpoint": "has no checkpoint",
            "missing image": "no such image", "not an image": "notes.jpg: not a JPEG, PNG"}[case] in lines[0]


@pytest.mark.slow
def test_saved_model_cli_run_rejects_a_wrong_size(exported, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((1, 224, 224, 3), np.float32))
    result = subprocess.run([SAVED_MODEL_CLI, "run", "--dir", str(exported), "--tag_set", "serve",
                             "--signature_def", "serving_default", "--inputs", f"images={tmp_path / 'x.npy'}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "images must be float32 [N, 227, 227, 3], RGB 0-255; got shape] [1 224 224 3]" in result.stderr


def zeros_png(width, height):
    """A 1-bit greyscale PNG of zeros: about 50 KB for 20000 x 20000, which decode to 1.2 GB of RGB."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    compressor, row = zlib.compressobj(9), b"\0" * (1 + (width + 7) // 8)  # Filter byte, packed bits.
    pixels = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


PEAK = """
import sys
import tensorflow as tf
predict = tf.saved_model.load(sys.argv[1]).signatures["predict_images"]
small, huge = (open(path, "rb").read() for path in sys.argv[2:4])
predict(image_bytes=tf.constant([small]))  # Warm: what the next call adds is the call's own.
kilobytes = lambda key: int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1])
open("/proc/self/clear_refs", "w").write("5")  # The peak (VmHWM) starts again from the current RSS.
before = kilobytes("VmRSS:")
try:
    predict(image_bytes=tf.constant([huge]))
    print("decoded")
except tf.errors.InvalidArgumentError as error:
    print("refused:", error.message)
print("peak", (kilobytes("VmHWM:") - before) * 1024)
"""


@pytest.mark.slow
def test_a_huge_png_is_refused_before_decoding(exported, image_files, tmp_path):
    huge = zeros_png(20000, 20000)
    assert len(huge) < 100_000
    (tmp_path / "huge.png").write_bytes(huge)
    result = run_cli("-c", PEAK, str(exported), image_files[0], str(tmp_path / "huge.png"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "refused: " in result.stdout and "image of 20000 x 20000 pixels is above the limit of 64 megapixels" \
        in result.stdout, result.stdout[-2000:]
    peak = int(re.search(r"peak (\d+)", result.stdout).group(1))
    assert peak < 2 ** 30, f"the refused call raised the peak RSS by {peak / 2 ** 20:.0f} MB"
    (tmp_path / "train" / "big").mkdir(parents=True)  # Training counts it as corrupt, as it does tiny ones.
    (tmp_path / "train" / "big" / "huge.png").write_bytes(huge)
    source = sources.load_source(str(tmp_path), "train", val_fraction=0.0)
    decoded, skipped = sources.decoded_images(source)
    assert list(decoded) == [] and skipped() == 1


def encoded_png(side):
    buffer = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), 90, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("side", [1, 7, 8])
def test_tiny_images_are_refused_alike_in_serving_and_training(side, loaded, tmp_path):
    (tmp_path / "train" / "tiny").mkdir(parents=True)
    (tmp_path / "train" / "tiny" / "a.png").write_bytes(encoded_png(side))
    source = sources.load_source(str(tmp_path), "train", val_fraction=0.0)
    images, skipped = sources.decoded_images(source)
    decoded = list(images)
    for name in ("predict_images", "features_images"):
        if side < preprocess.MIN_SIDE:
            with pytest.raises(tf.errors.InvalidArgumentError,
                               match=f"image of {side} x {side} pixels is under the minimum of 8 pixels a side"):
                loaded[name](image_bytes=tf.constant([encoded_png(side)]))
        else:
            assert len(next(iter(loaded[name](image_bytes=tf.constant([encoded_png(side)])).values()))) == 1
    assert (len(decoded), skipped()) == ((0, 1) if side < preprocess.MIN_SIDE else (1, 0))


def test_export_command_sets_the_size_limit_and_says_what_it_replaced(narrow_run_dir, image_files, tmp_path):
    model_dir, _ = narrow_run_dir
    (tmp_path / str(STEP)).mkdir()
    (tmp_path / str(STEP) / "stale").write_text("an older export")
    result = run_program("export", f"--model_dir={model_dir}", f"--export_dir={tmp_path}",
                     "--max_megapixels=0.05")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[-1] == f"replaced version {STEP}"
    assert sorted(os.listdir(tmp_path)) == [str(STEP)] and not (tmp_path / str(STEP) / "stale").exists()
    loaded = tf.saved_model.load(str(tmp_path / str(STEP)))
    assert float(loaded.max_megapixels.numpy()) == pytest.approx(0.05)
    with pytest.raises(tf.errors.InvalidArgumentError,  # 320 x 240 = 0.077 megapixels.
                       match="image of 320 x 240 pixels is above the limit of 0.05 megapixels"):
        loaded.signatures["predict_images"](image_bytes=tf.constant([Path(image_files[0]).read_bytes()]))

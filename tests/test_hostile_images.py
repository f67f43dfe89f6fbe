"""Hostile images: memory bounded by the 256x256 output of section 2's rescale and crop, whatever the
image's shape, and JPEGs turned upright by their Exif orientation, in every path that decodes."""
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps, PngImagePlugin

from conftest import NARROW, shared_data
from keras_alexnet import export, preprocess
from keras_alexnet.model import build_alexnet

LONG = (8, 200_000)  # Rescaled whole: 256 x 6,400,000 x 3 floats, 20 GB.
PEAK_LIMIT_MB = 300
ORIENTATION = 0x0112


def encode(array, fmt="PNG", **options):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def long_image():
    """LONG, black but for random columns around the centre, the only ones the crop samples."""
    image = np.zeros((*LONG, 3), np.uint8)
    middle = LONG[1] // 2
    image[:, middle - 16:middle + 16] = np.random.default_rng(0).integers(0, 256, (LONG[0], 32, 3))
    return image


@pytest.fixture(scope="module")
def files(tmp_path_factory, long_image):
    """The long PNG (a few KB) and a normal one, each alone in a folder of class folders."""
    root = tmp_path_factory.mktemp("hostile")
    normal = np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    paths = {}
    for name, image in [("normal", normal), ("long", long_image)]:
        (root / name / "class").mkdir(parents=True)
        paths[name] = root / name / "class" / f"{name}.png"
        paths[name].write_bytes(encode(image))
    assert paths["long"].stat().st_size < 50_000
    return paths


@pytest.fixture(scope="module")
def serving(tmp_path_factory):
    """(serving module, its SavedModel) of one 2-class narrow AlexNet (Glorot's weights: under Caffe's fillers
    the narrow net's fc7 hardly depends on the image)."""
    model = build_alexnet(num_classes=2, seed=0, init="glorot", **NARROW)
    stats = preprocess.Stats.imagenet()
    saved = export.export_saved_model(model, ["cat", "dog"], stats, str(tmp_path_factory.mktemp("export")), 1)
    return export.serving_module(model, ["cat", "dog"], stats), saved


# Run in a fresh process: the peak RSS (ru_maxrss, KB on Linux) a path adds for the long image, once it
# has run on a normal one. Its address space is capped 2 GB above that, so that a path that would rescale
# the whole image fails at once (out of memory) instead of taking the machine's 20 GB.
MEASURE = r"""
import json, resource, sys
import numpy as np, tensorflow as tf
from keras_alexnet import preprocess, sources

path, saved_model, normal, long, out = sys.argv[1:]
if path == "decode_and_resize":
    run = lambda file: preprocess.decode_and_resize(tf.io.read_file(file)).numpy()
elif path == "training_folder":
    def run(file):
        source = sources.load_source(file.rsplit("/", 2)[0], "train", val_fraction=0.0)
        index, image, ok, label = next(sources.load_images(sources.indexed_records(source), source.load)
                                       .as_numpy_iterator())
        assert ok, "the image was flagged as unreadable"
        return image
else:
    signature = tf.saved_model.load(saved_model).signatures["predict_images"]
    run = lambda file: signature(image_bytes=tf.io.read_file(file)[None])["probabilities"].numpy()
run(normal)
size = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + 2 ** 31, resource.getrlimit(resource.RLIMIT_AS)[1]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
result = run(long)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
np.save(out, result)
print(json.dumps({"growth_mb": (after - before) / 1024}))
"""


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="measures peak RSS and address space as Linux reports them")
@pytest.mark.parametrize("path", ["decode_and_resize", "training_folder", "predict_images"])
def test_a_long_thin_image_costs_memory_of_the_output_only(path, files, long_image, serving, tmp_path):
    module, saved = serving
    out = tmp_path / "result.npy"
    result = subprocess.run([sys.executable, "-c", MEASURE, path, saved, str(files["normal"]), str(files["long"]),
                             str(out)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    growth = json.loads(result.stdout.splitlines()[-1])["growth_mb"]
    assert growth < PEAK_LIMIT_MB, f"{path}: the {LONG[0]} x {LONG[1]} PNG raised peak RSS by {growth:.0f} MB"
    # And it is the right image: that of the random columns alone (the samples fall 4 columns inside them).
    middle = LONG[1] // 2
    window = encode(long_image[:, middle - 16:middle + 16])
    if path == "predict_images":
        expected = module.predict_images(tf.constant([window]))["probabilities"].numpy()
        np.testing.assert_allclose(np.load(out), expected, rtol=1e-5)
    else:
        np.testing.assert_array_equal(np.load(out), preprocess.decode_and_resize(window).numpy())


def triangle_weights(length, scaled, size=256):
    """[size, length] float64: each output pixel's weights of the source pixels when `length` is rescaled
    to `scaled` by the antialiased triangle (bilinear) filter and the centre `size` kept (the scale
    as TensorFlow holds it, in float32)."""
    inverse = 1 / float(np.float32(scaled) / np.float32(length))
    radius = max(inverse, 1)
    centres = ((scaled - size) // 2 + np.arange(size) + 0.5) * inverse  # In source pixels.
    weights = np.maximum(0, 1 - np.abs(np.arange(length) + 0.5 - centres[:, None]) / radius)
    return weights / weights.sum(1, keepdims=True)


@pytest.mark.parametrize("shape", [(8, 1000), (1000, 8), (9, 301), (37, 29), (255, 257), (256, 400), (511, 1023),
                                   (3000, 40), (257, 10000), (4001, 2999)])
def test_resizing_the_crop_alone_gives_the_exact_rescaled_centre(shape):
    """Section 2's shorter side to 256 then centre crop, in float64: every pixel is its rounding, to within
    0.01 (tf.image.resize rescaling the whole image is off by up to 0.12 at (257, 10000))."""
    image = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    scaled = [max(int(np.round(np.float32(side) * 256 / np.float32(min(shape)))), 256) for side in shape]
    rows, cols = (triangle_weights(side, new) for side, new in zip(shape, scaled))
    exact = np.einsum("xh,hwc,yw->xyc", rows, image.astype(np.float64), cols, optimize=True)
    assert np.abs(preprocess.resize_and_crop(image).numpy() - exact).max() <= 0.51


# ----------------------------------------------------------------------------- Exif orientation

def exif(orientation=None, endian="<", **tags):
    """Exif bytes in byte order `endian` ("<" II, ">" MM) with some IFD0 tags and the orientation."""
    data = Image.Exif()
    data.endian = endian
    data.update({0x010F: "Maker", 0x0110: "Model", 0x0131: "software", **tags})  # Make, Model, Software.
    if orientation is not None:
        data[ORIENTATION] = orientation
    return data.tobytes()


@pytest.fixture(scope="module")
def photo():
    return np.asarray(Image.open(shared_data("skimage_photos") / "chelsea.png").convert("RGB"))  # 300 x 451


@pytest.mark.parametrize("endian", ["<", ">"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_decode_turns_a_jpeg_as_pil_exif_transpose_does(photo, orientation, endian):
    data = encode(photo, "JPEG", exif=exif(orientation, endian), quality=90)
    assert data[:4] == b"\xff\xd8\xff\xe0"  # The Exif segment follows JFIF's APP0.
    decoded = preprocess.decode(data).numpy()
    stored = Image.fromarray(tf.io.decode_jpeg(data).numpy())  # TensorFlow's pixels, turned by PIL.
    stored.info["exif"] = exif(orientation, endian)
    np.testing.assert_array_equal(decoded, np.asarray(ImageOps.exif_transpose(stored)))
    by_pil = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")).astype(int)
    assert decoded.shape == by_pil.shape
    difference = np.abs(decoded - by_pil)  # The two JPEG decoders' chroma upsampling: mean 1.0, max 5.
    assert difference.mean() < 2 and difference.max() <= 10, (difference.mean(), difference.max())


def raw_exif(*entries, count=None):
    """Exif bytes (big-endian) of an IFD0 of the given 12-byte entries, claiming `count` of them."""
    count = len(entries) if count is None else count
    return b"Exif\0\0MM\0*\0\0\0\x08" + count.to_bytes(2, "big") + b"".join(entries)


def chunk(data):
    """A PNG's ancillary chunk holding `data` (decoders skip it)."""
    info = PngImagePlugin.PngInfo()
    info.add(b"teSt", data)
    return info


def test_images_without_a_valid_orientation_stay_as_stored(photo):
    small = photo[:40, :60]
    jpeg = lambda exif_bytes: encode(small, "JPEG", exif=exif_bytes, quality=90)
    rotated = b"\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00"  # Orientation, SHORT, 1 value: 6.
    assert int(preprocess.exif_orientation(jpeg(raw_exif(rotated)))) == 6  # The cases below are its variants.
    cases = {
        "no Exif": encode(small, "JPEG", quality=90),
        "no orientation tag": jpeg(exif()),
        "orientation 0": jpeg(exif(0)),
        "orientation 9": jpeg(exif(9)),
        "orientation as a LONG": jpeg(raw_exif(rotated[:3] + b"\x04" + rotated[4:])),
        "orientation past IFD0's count": jpeg(raw_exif(rotated, count=0)),
        "IFD0 past the end of the file": jpeg(b"Exif\0\0MM\0*\x7f\xff\xff\xff"),
        "TIFF header cut short": jpeg(b"Exif\0\0MM"),
        "Exif in a JPEG comment": encode(small, "JPEG", comment=raw_exif(rotated), quality=90),
        "a PNG": encode(small, "PNG", exif=exif(6)),
        "a PNG holding a JPEG's Exif segment": encode(small, pnginfo=chunk(b"\xff\xe1\0\x20" + raw_exif(rotated))),
        "a WebP": encode(small, "WEBP", exif=exif(6), lossless=True),
    }
    for name, data in cases.items():
        assert int(preprocess.exif_orientation(data)) == 1, name
        np.testing.assert_array_equal(preprocess.decode(data).numpy(),
                                      tf.io.decode_image(data, 3, expand_animations=False).numpy(), err_msg=name)


def test_the_bytes_signatures_see_the_upright_image(photo, serving):
    module, _ = serving
    data = encode(photo, "JPEG", exif=exif(6, ">"), quality=90)
    upright = np.rot90(tf.io.decode_jpeg(data).numpy(), -1)  # 6: rotated 90 degrees clockwise.
    resized = preprocess.resize_and_crop(upright)
    np.testing.assert_array_equal(preprocess.decode_and_resize(data).numpy(), resized.numpy())
    fc7 = module.features_images(tf.constant([data]))["fc7"].numpy()
    of_pixels = module.features(preprocess.center_crop(tf.cast(resized, tf.float32))[None])["fc7"].numpy()
    tolerance = 1e-4
    np.testing.assert_allclose(fc7, of_pixels, rtol=tolerance, atol=tolerance)
    as_stored = module.features_images(tf.constant([encode(photo, "JPEG", quality=90)]))["fc7"].numpy()
    assert np.abs(as_stored - fc7).max() > 100 * tolerance  # The check above tells the two apart.

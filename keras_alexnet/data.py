"""The input pipeline of section 2 (256x256 images, mean subtraction) and 4.1 (data augmentation).

Sources (`load_source`) yield decoded uint8 [256, 256, 3] images: the shorter side rescaled to 256,
then the central 256x256 patch (section 2). Pipelines (`train_pipeline`, `eval_pipeline`) subtract
the mean image and take the paper's 227x227 crops: random crops, horizontal flips and fancy-PCA
lighting for training (section 4.1), the centre crop or the 10-crop test for evaluation.
"""
import collections
import dataclasses
import hashlib
import io
import math
import os
import zipfile

import numpy as np
import tensorflow as tf

from keras_alexnet import synthetic

IMAGE_SIZE = 256
CROP_SIZE = 227
MIN_SIDE = 8  # Decodable images smaller than this (tracking pixels, placeholders) count as corrupt.
MAX_MEGAPIXELS = 64  # Larger images are refused before decoding (a 48 KB PNG can claim 400 megapixels).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
FORMATS = "JPEG, PNG, GIF, BMP or WebP"  # Those whose size `image_size` reads from the header.
AUTOTUNE = tf.data.AUTOTUNE


class DataError(ValueError):
    """A user-facing, one-line problem with the data: bad folder, unknown dataset, missing split."""


@dataclasses.dataclass
class Stats:
    """Data statistics: the mean image (section 2) and the RGB covariance eigen-figures (section 4.1)."""
    mean_image: np.ndarray    # (256, 256, 3) float32, 0-255 units.
    channel_mean: np.ndarray  # (3,)
    eigenvalues: np.ndarray   # (3,) of the RGB covariance of pixel values scaled to 0-1, descending.
    eigenvectors: np.ndarray  # (3, 3), column i belongs to eigenvalues[i].

    def __post_init__(self):
        for name, shape in [("mean_image", (IMAGE_SIZE, IMAGE_SIZE, 3)), ("channel_mean", (3,)),
                            ("eigenvalues", (3,)), ("eigenvectors", (3, 3))]:
            value = np.asarray(getattr(self, name), np.float32)
            if value.shape != shape:
                raise DataError(f"statistics: {name} has shape {value.shape}, expected {shape}")
            setattr(self, name, value)

    @classmethod
    def imagenet(cls):
        """ILSVRC-2012 figures, for when no statistics of the data at hand were computed.

        Channel means (R, G, B) = (123.68, 116.78, 103.94) of the ILSVRC-2012 training set, as used by
        the Caffe / VGG models (Simonyan & Zisserman 2014), broadcast to 256x256 (the paper subtracts
        a mean image; these per-channel means are its spatial average). Eigenvalues and eigenvectors of
        the RGB covariance (pixels in 0-1) as published in fb.resnet.torch (datasets/imagenet.lua,
        `pca`), the figures widely used to reproduce section 4.1's lighting augmentation.
        """
        channel_mean = np.array([123.68, 116.78, 103.94], np.float32)
        return cls(mean_image=np.broadcast_to(channel_mean, (IMAGE_SIZE, IMAGE_SIZE, 3)),
                   channel_mean=channel_mean,
                   eigenvalues=np.array([0.2175, 0.0188, 0.0045]),
                   eigenvectors=np.array([[-0.5675, 0.7192, 0.4009],
                                          [-0.5808, -0.0045, -0.8140],
                                          [-0.5836, -0.6948, 0.4203]]))

    @classmethod
    def load(cls, path):
        """Reads an .npz written by `save` (or `python -m keras_alexnet.stats`)."""
        if not tf.io.gfile.exists(path):
            raise FileNotFoundError(f"statistics file {path} does not exist")
        with tf.io.gfile.GFile(path, "rb") as f:
            try:
                arrays = np.load(io.BytesIO(f.read()))
            except (ValueError, OSError, EOFError, zipfile.BadZipFile):  # Text gets numpy's pickle message.
                arrays = None
            if not isinstance(arrays, np.lib.npyio.NpzFile):  # Also a lone .npy array.
                raise DataError(f"statistics file {path} is not an .npz of python -m keras_alexnet.stats")
            missing = {f.name for f in dataclasses.fields(cls)} - set(arrays.files)
            if missing:
                raise DataError(f"statistics file {path} lacks {', '.join(sorted(missing))}")
            return cls(**{f.name: arrays[f.name] for f in dataclasses.fields(cls)})

    def save(self, path):
        """Writes the .npz to a temporary name, renamed to `path` once complete."""
        buffer = io.BytesIO()
        np.savez(buffer, **dataclasses.asdict(self))
        with tf.io.gfile.GFile(f"{path}.tmp", "wb") as f:
            f.write(buffer.getvalue())
        tf.io.gfile.rename(f"{path}.tmp", str(path), overwrite=True)


Source = collections.namedtuple("Source", ["records", "load", "class_names", "num_examples"])
Source.__doc__ = """A split of a dataset, in a fixed order.

records: tf.data.Dataset of (payload, int32 label), cheap to hold and shuffle: a file path, the
    encoded bytes, a synthetic image's index, or a decoded image.
load: payload -> uint8 [256, 256, 3], in-graph; it fails on a bad file (`load_images` catches that).
class_names: list of str, index = label.
num_examples: the number of records (files that turn out corrupt are included).
"""


def array_source(images, labels, class_names):
    """A Source over decoded uint8 [N, 256, 256, 3] images held in memory (tests, benchmarks)."""
    records = tf.data.Dataset.from_tensor_slices((np.asarray(images, np.uint8), np.asarray(labels, np.int32)))
    return Source(records, tf.identity, list(class_names), len(images))


# ----------------------------------------------------------------------------- in-graph helpers

def decode_and_resize(image_bytes, max_megapixels=MAX_MEGAPIXELS):
    """Scalar string (JPEG, PNG, GIF's first frame, BMP, WebP) -> uint8 [256, 256, 3] (section 2).

    Greyscale, CMYK and RGBA become RGB; the shorter side is rescaled to 256 (bilinear, antialiased),
    then the central 256x256 patch is cropped. Refused before decoding, by their header, with an
    InvalidArgumentError that names the size: images above `max_megapixels` or under MIN_SIDE pixels a
    side; and bytes of another format (also those tf.io.decode_image takes but whose size is not read
    here, JPEG XL).
    """
    return resize_and_crop(_decode(image_bytes, tf.cast(max_megapixels, tf.float64)))


# A graph also when called eagerly: the error then reads "assertion failed: [image of ...]".
@tf.function(input_signature=[tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.float64)])
def _decode(image_bytes, max_megapixels=float(MAX_MEGAPIXELS)):
    height, width = tf.unstack(image_size(image_bytes))
    unknown = height < 0
    too_small = tf.minimum(height, width) < MIN_SIDE
    too_large = tf.cast(height * width, tf.float64) > max_megapixels * 1e6
    size = tf.strings.format("image of {} x {} pixels is ", (width, height))
    limit = tf.strings.as_string(tf.cast(max_megapixels, tf.float32), shortest=True)
    why = tf.where(unknown, f"not a {FORMATS} image", tf.where(
        too_small, size + f"under the minimum of {MIN_SIDE} pixels a side",
        size + "above the limit of " + limit + " megapixels"))
    with tf.control_dependencies([tf.debugging.Assert(~(unknown | too_small | too_large), [why])]):
        image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


HEADER = 30  # Bytes of an image file that hold its size (JPEG aside).


def image_size(image_bytes):
    """int64 [height, width] from the header of a JPEG, PNG, GIF, BMP or WebP, without decoding.

    [-1, -1] for bytes of another kind.
    """
    head = tf.strings.join([tf.strings.substr(image_bytes, 0, HEADER), "\0" * HEADER])  # Short files: zeros.
    head = tf.strings.substr(head, 0, HEADER)
    digits = tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)

    def number(start, length, big_endian=False):
        """The unsigned integer in bytes [start, start + length) of the header."""
        places = range(length - 1, -1, -1) if big_endian else range(length)
        return sum(digits[start + i] * 256 ** place for i, place in enumerate(places))

    def starts(magic, at=0):
        return tf.equal(tf.strings.substr(head, at, len(magic)), magic)

    def bmp():  # A negative (two's complement) height: rows stored top to bottom.
        height = number(22, 4)
        return tf.stack([tf.where(height >= 2 ** 31, 2 ** 32 - height, height), number(18, 4)])

    def webp_lossless():  # 14 bits width - 1, then 14 bits height - 1.
        bits = number(21, 4)
        return tf.stack([bits // 2 ** 14 % 2 ** 14 + 1, bits % 2 ** 14 + 1])

    webp = starts(b"RIFF") & starts(b"WEBP", 8)
    sizes = [  # (is this format, lambda: [height, width]), by the magic bytes tf.io.decode_image tests.
        (starts(b"\xff\xd8\xff"), lambda: tf.cast(tf.image.extract_jpeg_shape(image_bytes)[:2], tf.int64)),
        (starts(b"\x89PNG\r\n\x1a\n"), lambda: tf.stack([number(20, 4, True), number(16, 4, True)])),
        (starts(b"GIF8"), lambda: tf.stack([number(8, 2), number(6, 2)])),  # The canvas TF decodes to.
        (starts(b"BM"), bmp),
        (webp & starts(b"VP8 ", 12), lambda: tf.stack([number(28, 2) % 2 ** 14, number(26, 2) % 2 ** 14])),
        (webp & starts(b"VP8L", 12), webp_lossless),
        (webp & starts(b"VP8X", 12), lambda: tf.stack([number(27, 3) + 1, number(24, 3) + 1])),
    ]
    return tf.case(sizes, default=lambda: tf.constant([-1, -1], tf.int64))


def resize_and_crop(image, size=IMAGE_SIZE):
    """uint8 [H, W, 3] -> uint8 [size, size, 3]: shorter side to `size`, then the centre crop."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scaled = tf.maximum(tf.cast(tf.round(shape * size / tf.reduce_min(shape)), tf.int32), size)
    image = tf.image.resize(image, scaled, method="bilinear", antialias=True)
    image = center_crop(image, size)
    # Static shape too: cached images must have a known shape (eval_pipeline's padding images).
    return tf.ensure_shape(tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8), [size, size, 3])


def center_crop(images, size=CROP_SIZE):
    """The central size x size patch of [..., H, W, C] (a single image or a batch)."""
    images = tf.convert_to_tensor(images)
    shape = tf.shape(images)
    top, left = (shape[-3] - size) // 2, (shape[-2] - size) // 2
    return images[..., top:top + size, left:left + size, :]


def ten_crop(image, size=CROP_SIZE):
    """The 10-crop test of section 4.1: [H, W, C] -> [10, size, size, C].

    Order: centre, top-left, top-right, bottom-left, bottom-right, then the same five flipped
    horizontally.
    """
    shape = tf.shape(image)
    bottom, right = shape[0] - size, shape[1] - size
    crops = [center_crop(image, size)] + [image[y:y + size, x:x + size, :] for y, x in
                                          [(0, 0), (0, right), (bottom, 0), (bottom, right)]]
    crops = tf.stack(crops)
    return tf.concat([crops, tf.reverse(crops, axis=[2])], axis=0)


def pca_lighting(image, alphas, stats):
    """Section 4.1's lighting change: adds sum_i alpha_i * lambda_i * p_i to every pixel.

    image: float32 in 0-255 units; alphas: [3], drawn from N(0, 0.1) once per image. The eigen-figures
    are of pixel values in 0-1, hence the factor 255. No clipping (the paper mentions none).
    """
    eigenvectors = tf.constant(stats.eigenvectors)
    shift = tf.linalg.matvec(eigenvectors, tf.cast(alphas, tf.float32) * stats.eigenvalues) * 255.0
    return image + shift


_pca_lighting, _ten_crop = pca_lighting, ten_crop  # For the pipelines, whose arguments shadow the names.


# ----------------------------------------------------------------------------- sources

def load_source(dataset, split, data_dir=None, val_fraction=0.1, seed=0, class_names=None):
    """The `split` of `dataset` as a `Source`.

    dataset: "synthetic" (built-in, see keras_alexnet.synthetic), a folder of class folders, or a
        TFDS name such as "imagenette/320px-v2", "tf_flowers" or "imagenet2012".
    split: "train" or "validation" ("val" also works); other TFDS split names pass through.
    Folders: DATASET/train and DATASET/val (or validation) are used when present; otherwise DATASET
        holds the class folders (or only DATASET/train exists) and the validation split is the
        `val_fraction` of the files whose path hash falls below it: the same for every seed. Classes are
        the sorted folder names. `seed` fixes the (shuffled) order of the files. TFDS datasets
        without a validation split use the last `val_fraction` of "train" (TFDS slicing) instead.
    class_names: the label of each class name (e.g. a run's labels.txt): the split's classes are
        matched to them by name, and a class not among them is a DataError naming it; a split may
        have fewer. Default: the dataset's own (for folders, the training split's folders).
    Files that fail to load (truncated, empty, not an image, too small or too large) are flagged by
    `load_images`.
    """
    split = {"val": "validation"}.get(split, split)
    if dataset == "synthetic":
        source = _synthetic_source(split)
    elif tf.io.gfile.isdir(dataset):
        return _folder_source(dataset, split, val_fraction, seed, class_names)
    elif dataset.startswith((".", "~")) or os.path.isabs(dataset) or "://" in dataset:
        raise DataError(f"dataset folder {dataset} does not exist")
    else:
        source = _tfds_source(dataset, split, data_dir, val_fraction)
    if class_names is None or list(class_names) == source.class_names:
        return source
    labels = tf.constant(_labels_by_name(source.class_names, class_names, f"{dataset} ({split})"), tf.int32)
    return source._replace(records=source.records.map(lambda payload, label: (payload, tf.gather(labels, label))),
                           class_names=list(class_names))


def _labels_by_name(names, class_names, where):
    """The label in `class_names` of each of `names`, or a DataError naming those it lacks."""
    unknown = [name for name in names if name not in class_names]
    if unknown:
        shown = lambda some: ", ".join(map(repr, some[:10])) + (", ..." if len(some) > 10 else "")
        raise DataError(f"{where} has classes its labels do not know: {shown(unknown)} (the "
                        f"{len(class_names)} known: {shown(list(class_names))})")
    return [list(class_names).index(name) for name in names]


def _synthetic_source(split):
    if split not in synthetic.SIZES:
        raise DataError(f"synthetic has no split {split!r}; it has {', '.join(synthetic.SIZES)}")
    records = tf.data.Dataset.range(synthetic.SIZES[split]).map(lambda index: (index, synthetic.label(index)))
    return Source(records, synthetic.image_function(split), list(synthetic.CLASS_NAMES), synthetic.SIZES[split])


def _folder_source(root, split, val_fraction, seed, class_names):
    subfolders = {name.rstrip("/") for name in tf.io.gfile.listdir(root)}
    val_name = next((name for name in ("val", "validation") if name in subfolders), None)
    if "train" in subfolders and val_name:
        if split not in ("train", "validation"):
            raise DataError(f"{root} has no split {split!r}; use train or validation")
        classes_root, held_out = os.path.join(root, "train" if split == "train" else val_name), None
    elif split in ("train", "validation"):
        classes_root = os.path.join(root, "train") if "train" in subfolders else root
        held_out = split == "validation"
    else:
        raise DataError(f"{root} has no split {split!r}; use train or validation")
    folders, paths, labels = _list_images(classes_root)
    if class_names is None:  # The training split's folders define the labels.
        class_names = folders if held_out is not None or split == "train" else \
            _class_folders(os.path.join(root, "train"))
    by_name = _labels_by_name(folders, class_names, classes_root)
    labels = [by_name[label] for label in labels]
    if held_out is not None:
        keep = [(_path_fraction(os.path.relpath(p, classes_root)) < val_fraction) == held_out for p in paths]
        paths, labels = [p for p, k in zip(paths, keep) if k], [l for l, k in zip(labels, keep) if k]
        if not paths:
            raise DataError(f"{root}: the {split} split (val_fraction={val_fraction}) holds no images")
    order = np.random.default_rng(seed).permutation(len(paths))
    records = tf.data.Dataset.from_tensor_slices(
        (np.array(paths, dtype=object)[order].astype(str), np.array(labels, np.int32)[order]))
    return Source(records, lambda path: _decode(tf.io.read_file(path)), list(class_names), len(paths))


def _class_folders(root):
    """The sorted names of the folders in `root`: its classes."""
    entries = sorted(tf.io.gfile.listdir(root))
    return [e.rstrip("/") for e in entries if tf.io.gfile.isdir(os.path.join(root, e))]


def _list_images(root):
    class_names = _class_folders(root)
    if not class_names:
        what = "files but no class subfolders" if tf.io.gfile.listdir(root) else "nothing"
        raise DataError(f"{root} holds {what}: expected {root}/<class name>/<image files>")
    paths, labels = [], []
    for label, name in enumerate(class_names):
        for file in sorted(tf.io.gfile.listdir(os.path.join(root, name))):
            if file.lower().endswith(IMAGE_EXTENSIONS) and not file.startswith("."):
                paths.append(os.path.join(root, name, file))
                labels.append(label)
    if not paths:
        raise DataError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
    return class_names, paths, labels


def _path_fraction(path):
    """A number in [0, 1) fixed by the path: which files are held out for validation."""
    return int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "big") / 2 ** 64


def _tfds_source(name, split, data_dir, val_fraction):
    import tensorflow_datasets as tfds  # Slow to import; only needed here.
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(f"unknown dataset {name!r}: not 'synthetic', not a folder, not a TFDS name") from None
    except ValueError as error:  # E.g. an unknown config of a known dataset.
        raise DataError(f"TFDS dataset {name!r}: {str(error).splitlines()[0]}") from None
    if not builder.is_prepared():
        manual = ""
        if name.startswith("imagenet2012"):
            manual_dir = os.path.join(data_dir or "~/tensorflow_datasets", "downloads", "manual")
            manual = f" after putting ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in {manual_dir}"
        raise DataError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir}: run `tfds build {name}"
            f"{' --data_dir=' + data_dir if data_dir else ''}`{manual} (or call "
            f"tfds.builder({name!r}).download_and_prepare())")
    splits = builder.info.splits
    if split in ("train", "validation") and "validation" not in splits and "train" in splits:
        cut = round(100 * (1 - val_fraction))
        split = f"train[:{cut}%]" if split == "train" else f"train[{cut}%:]"
    try:
        num_examples = splits[split].num_examples
    except (KeyError, ValueError, AssertionError):
        raise DataError(f"TFDS dataset {name!r} has no split {split!r}; it has {', '.join(splits)}") from None
    image_key, label_key = builder.info.supervised_keys or ("image", "label")
    records = builder.as_dataset(split=split, shuffle_files=False, as_supervised=True,
                                 decoders={image_key: tfds.decode.SkipDecoding()})
    records = records.map(lambda data, label: (data, tf.cast(label, tf.int32)))
    return Source(records, _decode, list(builder.info.features[label_key].names), num_examples)


def load_images(records, load):
    """(index, payload, label) -> (index, uint8 [256, 256, 3] image, ok, label), in order.

    ok is False, and the image zeros, when `load` fails on the payload: unreadable, empty, not an
    image, a JPEG cut short (TensorFlow refuses truncated JPEGs), smaller than MIN_SIDE or larger
    than MAX_MEGAPIXELS by its header (`_decode`). Each payload is loaded in a one-element dataset
    whose errors are ignored, so a bad file gives a flag instead of stopping the pipeline.
    """
    placeholder = tf.data.Dataset.from_tensors((tf.zeros([IMAGE_SIZE, IMAGE_SIZE, 3], tf.uint8), False))

    def try_load(index, payload, label):
        image = (tf.data.Dataset.from_tensors(payload).map(load).ignore_errors()
                 .map(lambda image: (resize_and_crop(image), True)))
        return image.concatenate(placeholder).take(1).map(lambda image, ok: (index, image, ok, label))

    return records.interleave(try_load, num_parallel_calls=AUTOTUNE, deterministic=True)


def has_readable_image(source):
    """True once one image of `source` loads: reads only as far as the first good file."""
    indexed = source.records.enumerate().map(lambda index, record: (index, *record))
    readable = load_images(indexed, source.load).filter(lambda index, image, ok, label: ok)
    return any(True for _ in readable.take(1))


def decoded_images(source):
    """(dataset of (uint8 [256, 256, 3], label) without the bad files, count of bad files so far).

    The count is complete once a pass over the dataset has ended (statistics, embeddings).
    """
    with tf.device("/cpu:0"):
        bad = tf.Variable(tf.zeros([source.num_examples], tf.bool), trainable=False, name="corrupt_files")

    def keep(index, image, ok, label):
        bad.scatter_nd_update(index[None, None], tf.logical_not(ok)[None])
        return ok

    indexed = source.records.enumerate().map(lambda index, record: (index, *record))
    images = load_images(indexed, source.load).filter(keep).map(lambda index, image, ok, label: (image, label))
    return images, lambda: int(tf.math.count_nonzero(bad))


# ----------------------------------------------------------------------------- pipelines
#
# Both pipelines cut a split into *global* batches first and give each tf.distribute input pipeline
# (one per worker) its slice of every global batch, which it splits into per-replica batches. So an
# image's batch, and its augmentation (keyed by seed, epoch and image index), do not depend on how
# many workers and replicas share the work: the same run on other devices is the same computation.
# Images that fail to load keep their place with the label -1: the losses and metrics skip them.

_caches = {}  # (records, cache) -> the cached dataset; lives as long as the process, as sources do.


def _records(source, cache=None):
    """(records of (index, payload, label), loaded): with `cache`, the payloads are already loaded
    into (image, ok) and cached in memory or in a file (filled here by one pass, so that every
    later epoch reads it, however little of it an epoch takes)."""
    records = source.records.enumerate().map(lambda index, record: (index, *record))
    if not cache:
        return records, False
    key = (source.records, cache)
    if key not in _caches:
        loaded = load_images(records, source.load).map(lambda index, image, ok, label: (index, (image, ok), label))
        loaded = loaded.cache("" if cache == "memory" else cache)
        loaded.reduce(0, lambda count, _: count + 1)
        _caches[key] = loaded
    return _caches[key], True


def _worker_examples(batches, source, loaded, input_context, batch_size):
    """Global batches of records -> this input pipeline's share as (index, image, ok, label)."""
    pipelines, pipeline_id = (input_context.num_input_pipelines, input_context.input_pipeline_id) \
        if input_context else (1, 0)
    if batch_size % pipelines:
        raise DataError(f"batch size {batch_size} does not split evenly over {pipelines} workers")
    share = batch_size // pipelines
    first = pipeline_id * share
    records = batches.map(lambda *batch: tuple(tf.nest.map_structure(lambda t: t[first:first + share], batch)))
    records = records.unbatch()
    if loaded:
        return records.map(lambda index, image_ok, label: (index, *image_ok, label))
    return load_images(records, source.load)


def _replica_batch_size(input_context, batch_size):
    return input_context.get_per_replica_batch_size(batch_size) if input_context else batch_size


def epoch_steps(num_examples, batch_size):
    """Training steps in one epoch: every full global batch of the reshuffled split."""
    return num_examples // batch_size


def train_pipeline(source, batch_size, stats, seed=0, epoch=0, first_step=0, steps=None, pca_lighting=True,
                   cache=None, input_context=None, shuffle_buffer=2048):
    """Steps [first_step, steps) of one training epoch: float32 [b, 227, 227, 3] minus the mean, int32 [b].

    Section 4.1: a random 227x227 crop (all 30x30 offsets equally likely) of the 256x256 image, a
    horizontal flip with probability 0.5, and (pca_lighting) the fancy-PCA lighting change. The mean
    image is subtracted before cropping, so each crop loses its matching patch of the mean.
    The epoch's order is a shuffle (buffer `shuffle_buffer`) seeded by (seed, epoch) and cut into
    `steps` (default: all) global batches of `batch_size`; an image's crop, flip and lighting come
    from stateless ops keyed by (seed, epoch, image index). So a run resumed at `first_step` sees the
    images it had not seen yet, with the augmentation it would have had.
    input_context: tf.distribute's (distribute_datasets_from_function): this worker's per-replica
        batches, b = batch_size / replicas; otherwise b = batch_size.
    cache: None, "memory" or a file path: decoded 256x256 images are kept after one pass.
    """
    steps = epoch_steps(source.num_examples, batch_size) if steps is None else steps
    mean = tf.constant(stats.mean_image)
    records, loaded = _records(source, cache)
    batches = (records.shuffle(shuffle_buffer, seed=seed * 1_000_003 + epoch)
               .batch(batch_size, drop_remainder=True).take(steps).skip(first_step))

    def augment(index, image, ok, label):
        key = tf.random.experimental.stateless_fold_in(tf.constant([seed, epoch], tf.int64), index)
        keys = tf.random.experimental.stateless_split(key, 3)
        top, left = tf.unstack(tf.random.stateless_uniform([2], keys[0], 0, IMAGE_SIZE - CROP_SIZE + 1, tf.int32))
        image = (tf.cast(image, tf.float32) - mean)[top:top + CROP_SIZE, left:left + CROP_SIZE, :]
        if pca_lighting:
            image = _pca_lighting(image, tf.random.stateless_normal([3], keys[1], stddev=0.1), stats)
        flip = tf.random.stateless_uniform([], keys[2]) < 0.5
        image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
        return tf.ensure_shape(image, [CROP_SIZE, CROP_SIZE, 3]), tf.where(ok, label, -1)

    examples = _worker_examples(batches, source, loaded, input_context, batch_size)
    return (examples.map(augment, num_parallel_calls=AUTOTUNE)
            .batch(_replica_batch_size(input_context, batch_size), drop_remainder=True)
            .prefetch(AUTOTUNE))


def eval_steps(num_examples, batch_size):
    """Evaluation batches that cover the whole split once (the last one padded)."""
    return math.ceil(num_examples / batch_size)


def eval_pipeline(source, batch_size, stats, ten_crop=False, input_context=None, steps=None, cache=None):
    """The split once, in order: float32 images minus the mean image, int32 labels.

    Images are the centre crop [b, 227, 227, 3], or with ten_crop the 10-crop test of section 4.1,
    [b, 10, 227, 227, 3] (view order as in `ten_crop`). The last global batch is padded to full size
    with label -1, so every replica gets a full batch and every image is counted once; `steps` caps
    the number of global batches. cache: "memory" keeps the decoded images after one pass.
    """
    mean = tf.constant(stats.mean_image)
    crop = _ten_crop if ten_crop else center_crop
    records, loaded = _records(source, cache if cache == "memory" else None)
    padding = eval_steps(source.num_examples, batch_size) * batch_size - source.num_examples
    blank = tf.nest.map_structure(lambda spec: tf.zeros(spec.shape, spec.dtype), records.element_spec)
    blank = (tf.constant(-1, tf.int64), blank[1], tf.constant(-1, tf.int32))
    batches = records.concatenate(tf.data.Dataset.from_tensors(blank).repeat(padding)).batch(batch_size)
    examples = _worker_examples(batches.take(steps or -1), source, loaded, input_context, batch_size)
    return (examples.map(lambda index, image, ok, label: (crop(tf.cast(image, tf.float32) - mean),
                                                          tf.where(ok & (label >= 0), label, -1)),
                         num_parallel_calls=AUTOTUNE)
            .batch(_replica_batch_size(input_context, batch_size))
            .prefetch(AUTOTUNE))

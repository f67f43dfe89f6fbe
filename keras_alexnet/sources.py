"""Where images come from: a folder of class folders, a TFDS dataset, or the built-in synthetic set.

A `Source` is a split in a fixed order, as cheap records (a path, the encoded bytes, an index) and the
function that loads one into a uint8 [256, 256, 3] image (preprocess). Labels come from the training
split's class names; other splits and other datasets are mapped to them by name.
"""
import collections
import hashlib
import os

import numpy as np
import tensorflow as tf

from keras_alexnet import synthetic
from keras_alexnet.preprocess import IMAGE_SIZE, DataError, decode, resize_and_crop

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
PREPARE_FACTS = "prepare.json"  # What `python -m keras_alexnet.prepare` writes first; TFDS's metadata comes last.
AUTOTUNE = tf.data.AUTOTUNE
LOAD_CHUNK = 16  # Records `load_images` loads in one go.


Source = collections.namedtuple("Source", ["records", "load", "class_names", "num_examples", "lookup", "shuffled"],
                                defaults=[None, None])
Source.__doc__ = """A split of a dataset, in a fixed order.

records: tf.data.Dataset of (payload, int32 label), cheap to hold: a file path, the encoded bytes, a
    synthetic image's index, or a decoded image.
load: payload -> uint8 [256, 256, 3], in-graph; it fails on a bad file (`load_images` catches that, but
    for `decode_prepared`, whose records prepare checked).
class_names: list of str, index = label.
num_examples: the number of records (files that turn out corrupt are included).
lookup: int64 indices [n] -> (payloads [n, ...], labels [n]), those records, in-graph: random access, so
    an epoch can be any permutation of the split (data.epoch_records). None for a source read in order only.
shuffled: for a source without `lookup`, seed -> its records in an order drawn from the seed (TFDS
    reads its files shuffled and interleaved).
"""


def random_access_source(payloads, labels, load, class_names):
    """A Source over in-memory `payloads` (an array whose first axis is the record) and int labels."""
    payloads, labels = tf.constant(payloads), tf.constant(np.asarray(labels, np.int32))
    lookup = lambda indices: (tf.gather(payloads, indices), tf.gather(labels, indices))
    return random_access(int(labels.shape[0]), lookup, load, class_names)


def random_access(num_examples, lookup, load, class_names):
    """The Source of records 0 .. num_examples - 1 as `lookup` (see Source) gives them."""
    records = tf.data.Dataset.range(num_examples).batch(1024).map(lookup).unbatch()
    return Source(records, load, list(class_names), num_examples, lookup)


def head(source, count):
    """The first `count` records of a random-access `source`, as a Source of its own (benchmarks)."""
    return random_access(count, source.lookup, source.load, source.class_names)


def index_source(num_examples, num_classes=1000):
    """A Source of `num_examples` records whose payload and label are the record's index (mod
    num_classes for the label): nothing to decode, for tests and benchmarks of the order at scale."""
    return random_access(num_examples, lambda indices: (indices, tf.cast(indices % num_classes, tf.int32)),
                           tf.identity, [str(i) for i in range(num_classes)])


def array_source(images, labels, class_names):
    """A Source over decoded uint8 [N, 256, 256, 3] images held in memory (tests, benchmarks)."""
    return random_access_source(np.asarray(images, np.uint8), labels, tf.identity, class_names)


def load_source(dataset, split, data_dir=None, val_fraction=0.1, seed=0, class_names=None, part=None):
    """The `split` of `dataset` as a `Source`.

    dataset: "synthetic" (built-in, see keras_alexnet.synthetic), a folder of class folders, a folder
        `python -m keras_alexnet.prepare` wrote (TFDS array_record files), or a TFDS name such as
        "imagenette/320px-v2", "tf_flowers" or "imagenet2012".
    split: "train" or "validation" ("val" also works); other TFDS split names pass through.
    Folders: DATASET/train and DATASET/val (or validation) are used when present; otherwise DATASET
        holds the class folders (or only DATASET/train exists) and the validation split is the
        `val_fraction` of the files whose path hash falls below it: the same for every seed. Classes are
        the sorted folder names. `seed` fixes the (shuffled) order of the files. TFDS datasets
        without a validation split use the last `val_fraction` of "train" (TFDS slicing) instead.
    class_names: the label of each class name (e.g. a run's labels.txt): the split's classes are
        matched to them by name, and a class not among them is a DataError naming it; a split may
        have fewer. Default: the dataset's own (for folders, the training split's folders).
    part: (index, count) for a TFDS dataset: the index-th of `count` even parts of the split
        (tfds.even_splits), read from its own files only: how prepare reads a split read in order.
    Files that fail to load (truncated, empty, not an image, too small or too large) are flagged by
    `load_images`.
    """
    split = {"val": "validation"}.get(split, split)
    if dataset == "synthetic":
        source = _synthetic_source(split)
    elif is_prepared(dataset):
        import tensorflow_datasets as tfds  # Slow to import; only needed here.
        ours = tf.io.gfile.exists(os.path.join(dataset, PREPARE_FACTS))  # Else another TFDS builder's folder.
        source = _builder_source(tfds.builder_from_directory(dataset), dataset, split, val_fraction, part,
                                 "delete it and run prepare again, which writes it anew" if ours
                                 else "write the dataset again", load=decode_prepared if ours else decode)
    elif tf.io.gfile.exists(os.path.join(dataset, PREPARE_FACTS)):
        raise DataError(f"{dataset} is a python -m keras_alexnet.prepare that has not finished: run it again")
    elif tf.io.gfile.isdir(dataset):
        return _folder_source(dataset, split, val_fraction, seed, class_names)
    elif dataset.startswith((".", "~")) or os.path.isabs(dataset) or "://" in dataset:
        raise DataError(f"dataset folder {dataset} does not exist")
    else:
        source = _tfds_source(dataset, split, data_dir, val_fraction, part)
    if class_names is None or list(class_names) == source.class_names:
        return source
    labels = tf.constant(_labels_by_name(source.class_names, class_names, f"{dataset} ({split})"), tf.int32)
    relabel = lambda payload, label: (payload, tf.gather(labels, label))
    return source._replace(records=source.records.map(relabel), class_names=list(class_names),
                           lookup=source.lookup and (lambda index: relabel(*source.lookup(index))),
                           shuffled=source.shuffled and (lambda seed: source.shuffled(seed).map(relabel)))


def is_prepared(folder):
    """Whether `folder` holds a finished `python -m keras_alexnet.prepare` (TFDS's dataset_info.json)."""
    return tf.io.gfile.exists(os.path.join(folder, "dataset_info.json"))


def _labels_by_name(names, class_names, where):
    """The label in `class_names` of each of `names`, or a DataError naming those it lacks.

    A name matches a label, or the label's first word: ImageNet folders are WordNet ids, and a
    synset_words.txt label is "n01440764 tench, Tinca tinca".
    """
    index = {**{name.split(" ", 1)[0]: i for i, name in enumerate(class_names)},
             **{name: i for i, name in enumerate(class_names)}}
    unknown = [name for name in names if name not in index]
    if unknown:
        shown = lambda some: ", ".join(map(repr, some[:10])) + (", ..." if len(some) > 10 else "")
        raise DataError(f"{where} has classes its labels do not know: {shown(unknown)} (the "
                        f"{len(class_names)} known: {shown(list(class_names))})")
    return [index[name] for name in names]


def _synthetic_source(split):
    if split not in synthetic.SIZES:
        raise DataError(f"synthetic has no split {split!r}; it has {', '.join(synthetic.SIZES)}")
    return random_access(synthetic.SIZES[split], lambda index: (index, synthetic.label(index)),
                           synthetic.image_function(split), synthetic.CLASS_NAMES)


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
    folders, paths, labels = _class_images(classes_root)
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
    return random_access_source(np.array(paths, dtype=object)[order].astype(str), np.array(labels)[order],
                                lambda path: decode(tf.io.read_file(path)), class_names)


def _class_folders(root):
    """The sorted names of the folders in `root` but hidden ones (".git"): its classes."""
    entries = sorted(tf.io.gfile.listdir(root))
    return [e.rstrip("/") for e in entries if not e.startswith(".") and tf.io.gfile.isdir(os.path.join(root, e))]


def list_images(folder):
    """Sorted (path relative to `folder`, label) of the image files at any depth below `folder`, a
    folder's files before its subfolders' (embed, neighbors, predict). The label is the name of the
    folder holding the file: class folders give class names, a flat folder its own name. Hidden names
    are skipped; a name with an image extension is taken for a file unchecked (a folder costs one
    listing, even on GCS); a folder reached twice through links is read once."""
    if not tf.io.gfile.isdir(folder):
        raise FileNotFoundError(f"{folder} is not a directory")
    found, seen = [], set()

    def visit(relative, label):
        here = os.path.join(folder, relative)
        if os.path.realpath(here) in seen:
            return
        seen.add(os.path.realpath(here))
        entries = sorted(e.rstrip("/") for e in tf.io.gfile.listdir(here) if not e.startswith("."))
        is_image = [_is_image(e) for e in entries]
        found.extend((os.path.join(relative, name), label) for name, image in zip(entries, is_image) if image)
        for name, image in zip(entries, is_image):
            if not image and tf.io.gfile.isdir(os.path.join(here, name)):
                visit(os.path.join(relative, name), name)

    visit("", os.path.basename(os.path.normpath(folder)))
    if not found:
        raise DataError(f"{folder} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return found


def _is_image(name):
    """Whether a file name is an image's: a known extension and not hidden."""
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _class_images(root):
    """(class names, paths, labels) of the images directly in root's class folders: one listing a
    class (an empty class folder is still a class)."""
    class_names = _class_folders(root)
    if not class_names:
        what = "files but no class subfolders" if tf.io.gfile.listdir(root) else "nothing"
        raise DataError(f"{root} holds {what}: expected {root}/<class name>/<image files>")
    paths, labels = [], []
    for label, name in enumerate(class_names):
        files = sorted(f.rstrip("/") for f in tf.io.gfile.listdir(os.path.join(root, name)))
        paths += [os.path.join(root, name, file) for file in files if _is_image(file)]
        labels += [label] * (len(paths) - len(labels))
    if not paths:
        raise DataError(f"{root} holds no image files ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
    return class_names, paths, labels


def _path_fraction(path):
    """A number in [0, 1) fixed by the path: which files are held out for validation."""
    return int.from_bytes(hashlib.sha256(path.encode()).digest()[:8], "big") / 2 ** 64


def _tfds_source(name, split, data_dir, val_fraction, part):
    import tensorflow_datasets as tfds  # Slow to import; only needed here.
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DataError(f"unknown dataset {name!r}: not 'synthetic', not a folder, not a TFDS name") from None
    except ValueError as error:  # E.g. an unknown config of a known dataset.
        raise DataError(f"TFDS dataset {name!r}: {str(error).splitlines()[0]}") from error
    if not builder.is_prepared():
        manual = ""
        if name.startswith("imagenet2012"):
            manual_dir = os.path.join(data_dir or "~/tensorflow_datasets", "downloads", "manual")
            manual = f" after putting ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in {manual_dir}"
        raise DataError(
            f"TFDS dataset {name!r} is not prepared in {builder.data_dir}: run `tfds build {name}"
            f"{' --data_dir=' + data_dir if data_dir else ''}`{manual} (or call "
            f"tfds.builder({name!r}).download_and_prepare())")
    return _builder_source(builder, name, split, val_fraction, part, f"rebuild it: tfds build {name} --overwrite")


def decode_prepared(image_bytes):
    """A record `prepare` wrote: its own upright 256x256 JPEG (checked when it was written), decoded without
    `decode`'s header and Exif checks (they cost as much as the decode); its JPEG header must say 256x256."""
    shape = tf.image.extract_jpeg_shape(image_bytes)  # Fails on anything but a JPEG.
    with tf.control_dependencies([tf.debugging.assert_equal(
            shape[:2], [IMAGE_SIZE, IMAGE_SIZE], message="not a prepared 256 x 256 JPEG")]):
        image = tf.io.decode_jpeg(image_bytes, channels=3)
    return tf.ensure_shape(image, [IMAGE_SIZE, IMAGE_SIZE, 3])


def _builder_source(builder, name, split, val_fraction, part, remedy, load=decode):
    """The Source of a prepared TFDS builder's split: by index from array_record files, else in order.
    `remedy`: what a DataError for an array_record file that cannot be read tells the user to do."""
    import tensorflow_datasets as tfds
    splits = builder.info.splits
    if split in ("train", "validation") and "validation" not in splits and "train" in splits:
        cut = round(100 * (1 - val_fraction))
        split = f"train[:{cut}%]" if split == "train" else f"train[{cut}%:]"
    if part:
        split = tfds.even_splits(split, part[1])[part[0]]
    try:
        num_examples = splits[split].num_examples
    except (KeyError, ValueError, AssertionError) as error:
        raise DataError(f"TFDS dataset {name!r} has no split {split!r}; it has {', '.join(splits)}") from error
    image_key, label_key = builder.info.supervised_keys or ("image", "label")
    class_names = builder.info.features[label_key].names
    if builder.info.file_format == tfds.core.file_adapters.FileFormat.ARRAY_RECORD:  # Random access.
        examples = builder.as_data_source(split, decoders={image_key: tfds.decode.SkipDecoding()})

        def read_examples(indices):
            try:
                chosen = examples.__getitems__(indices.tolist())
            except RuntimeError as error:  # array_record checks each chunk's hash as it reads.
                path = _unreadable_file(examples, indices)
                if path is None:  # Each record reads alone: not a damaged file.
                    raise
                raise DataError(f"{path} cannot be read ({' '.join(str(error).split())}): {remedy}") from None
            return (np.array([e[image_key] for e in chosen], object),
                    np.array([e[label_key] for e in chosen], np.int32))

        def lookup(indices):
            payloads, labels = tf.numpy_function(read_examples, [indices], (tf.string, tf.int32), stateful=False)
            return tf.ensure_shape(payloads, [None]), tf.ensure_shape(labels, [None])

        return random_access(num_examples, lookup, load, class_names)

    def read(shuffle_seed=None):  # In the prepared order, or its files shuffled and interleaved.
        records = builder.as_dataset(split=split, shuffle_files=shuffle_seed is not None, as_supervised=True,
                                     decoders={image_key: tfds.decode.SkipDecoding()},
                                     read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed))
        return records.map(lambda data, label: (data, tf.cast(label, tf.int32)))

    return Source(read(), load, list(class_names), num_examples, shuffled=read)


def _unreadable_file(examples, indices):
    """The file of the first of `indices` that a TFDS array_record data source fails to read, or None."""
    from tensorflow_datasets.core.data_sources import base
    files = base.file_instructions(examples.dataset_info, examples.split)
    ends = np.cumsum([file.take for file in files])
    for index in indices:
        try:
            examples[int(index)]
        except RuntimeError:
            return files[int(np.searchsorted(ends, index, side="right"))].filename
    return None


def indexed_records(source):
    """The source's records as (index, payload, label): the index names an image in every pipeline."""
    return source.records.enumerate().map(lambda index, record: (index, *record))


def load_images(records, load):
    """(index, payload, label) -> (index, uint8 [256, 256, 3] image, ok, label), in order.

    ok is False, and the image zeros, when `load` fails on the payload: unreadable, empty, not an
    image, a JPEG cut short (TensorFlow refuses truncated JPEGs), smaller than MIN_SIDE or larger
    than MAX_MEGAPIXELS by its header (`decode`). The records are loaded LOAD_CHUNK at a time, in a
    dataset whose errors are ignored: the images that loaded are put back at their places in the chunk,
    so a bad file gives a flag instead of stopping the pipeline (a dataset a record cost 0.7 ms of a
    core, more than decoding a prepared 256x256 JPEG). Prepared records (`decode_prepared`) are loaded
    as they are: `prepare` decoded each when it wrote it, and array_record checks every chunk's hash
    as it reads (a damaged file fails the read), so the catching would cost 0.35 ms a record for nothing.
    """
    if load is decode_prepared:
        return records.map(lambda index, payload, label: (index, load(payload), tf.constant(True), label),
                           num_parallel_calls=AUTOTUNE)

    def try_load(index, payload, label):
        count = tf.shape(index)[0]
        loaded = (tf.data.Dataset.from_tensor_slices((tf.range(count), payload)).map(
            lambda position, payload: (position, resize_and_crop(load(payload)))).ignore_errors().batch(LOAD_CHUNK)
            .concatenate(tf.data.Dataset.from_tensors((tf.zeros([0], tf.int32),
                                                       tf.zeros([0, IMAGE_SIZE, IMAGE_SIZE, 3], tf.uint8)))).take(1))

        def in_place(positions, images):  # Zeros for the images that failed (no copy when none did).
            images = tf.cond(tf.size(positions) == count, lambda: images, lambda: tf.scatter_nd(
                positions[:, None], images, [count, IMAGE_SIZE, IMAGE_SIZE, 3]))
            return index, images, tf.scatter_nd(positions[:, None], tf.ones_like(positions, tf.bool), [count]), label

        return loaded.map(in_place)

    chunks = records.batch(LOAD_CHUNK).interleave(try_load, num_parallel_calls=AUTOTUNE, deterministic=True)
    return chunks.unbatch()


def has_readable_image(source):
    """True once one image of `source` loads: reads only as far as the first good file. Eagerly, file by
    file as `load_images` tries them (a pipeline would cost a second of tracing at every start)."""
    for payload, _ in source.records:
        try:
            source.load(payload)
            return True
        except tf.errors.OpError:
            continue
    return False


def decoded_images(source):
    """(dataset of (uint8 [256, 256, 3], label) without the bad files, count of bad files so far).

    The count is complete once a pass over the dataset has ended (statistics, embeddings).
    """
    with tf.device("/cpu:0"):
        bad = tf.Variable(tf.zeros([source.num_examples], tf.bool), trainable=False, name="corrupt_files")

    def keep(index, image, ok, label):
        bad.scatter_nd_update(index[None, None], tf.logical_not(ok)[None])
        return ok

    images = load_images(indexed_records(source), source.load).filter(keep)
    images = images.map(lambda index, image, ok, label: (image, label))
    return images, lambda: int(tf.math.count_nonzero(bad))

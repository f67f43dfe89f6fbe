"""The training and evaluation pipelines: a Source's images as the network's batches (sections 2, 4.1).

Training takes random 227x227 crops, horizontal flips and fancy-PCA lighting of the 256x256 images
minus the mean image; evaluation the centre crop or the 10-crop test.
"""
import collections
import math

import numpy as np
import tensorflow as tf

from keras_alexnet import preprocess, sources
from keras_alexnet.errors import UserError
from keras_alexnet.files import atomic_write
from keras_alexnet.preprocess import CROP_SIZE, IMAGE_SIZE, DataError, center_crop
from keras_alexnet.progress import progress_bar
from keras_alexnet.sources import has_readable_image, indexed_records, load_images

AUTOTUNE = tf.data.AUTOTUNE


# ----------------------------------------------------------------------------- pipelines
#
# Both pipelines cut a split into *global* batches first and give each tf.distribute input pipeline
# (one per worker) its slice of every global batch, which it splits into per-replica batches. So an
# image's batch, and its augmentation (keyed by seed, epoch and image index), do not depend on how
# many workers and replicas share the work: the same run on other devices is the same computation.
# Images that fail to load keep their place with the label -1: the losses and metrics skip them.

_caches = {}  # (records, cache) -> the cache's records; lives as long as the process, as sources do.
CACHE_RECORD = np.dtype([("image", np.uint8, (IMAGE_SIZE, IMAGE_SIZE, 3)), ("ok", np.bool_), ("label", np.int32)])


class FillInterrupted(Exception):
    """`stop()` turned true while a cache was being filled (SIGTERM): the cache is not kept."""


def fill_cache(source, cache, stop=None):
    """`source` with its images decoded once into the cache ("memory", or an .npy file path): a
    random-access Source whose payloads are (image, ok). Filled on the first call for a source (with a
    progress bar; `stop()` is asked after every 64 images, FillInterrupted ends the fill), then kept for
    the process, so that the pipelines' later calls find it.

    A file is filled under a temporary name and renamed once complete (files.atomic_write): a complete
    file is reused, a partial one left by a killed process is filled anew.
    """
    key = (source.records, cache)
    if key not in _caches:
        records = np.lib.format.open_memmap(cache, "r") if cache != "memory" and tf.io.gfile.exists(cache) else None
        if records is not None and records.dtype != CACHE_RECORD:
            raise DataError(f"--cache file {cache} is no keras_alexnet image cache (its records are {records.dtype}): "
                            "remove it or name another file")
        if records is not None and records.shape != (source.num_examples,):
            raise DataError(f"--cache file {cache} holds {records.shape[0]} records, not this split's "
                            f"{source.num_examples} images: remove it or name another file")
        if records is None:
            records = _fill_cache(source, cache, stop or (lambda: False))

        def lookup(indices):
            image, ok, label = tf.numpy_function(lambda i: tuple(records[i][name] for name in CACHE_RECORD.names),
                                                 [indices], (tf.uint8, tf.bool, tf.int32), stateful=False)
            return (tf.ensure_shape(image, [None, IMAGE_SIZE, IMAGE_SIZE, 3]), tf.ensure_shape(ok, [None])), \
                tf.ensure_shape(label, [None])

        _caches[key] = sources.random_access(source.num_examples, lookup, None, source.class_names)
    return _caches[key]


def _fill_cache(source, cache, stop):
    """One pass over the split, in order, into a structured array (in memory or a memory-mapped .npy)."""
    loaded = load_images(indexed_records(source), source.load).batch(64).prefetch(2)

    def fill(records):
        bar = progress_bar(source.num_examples, "image")
        for index, image, ok, label in loaded.as_numpy_iterator():
            if stop():
                raise FillInterrupted(f"stopped filling the {cache} cache after {index[0]} images")
            records[index] = list(zip(image, ok, label))
            bar.add(len(index))
        return records

    if cache == "memory":
        return fill(np.empty(source.num_examples, CACHE_RECORD))
    with atomic_write(cache) as temporary:
        fill(np.lib.format.open_memmap(temporary, "w+", CACHE_RECORD, (source.num_examples,))).flush()
    return np.lib.format.open_memmap(cache, "r")


def _records(source, cache=None):
    """(the source, records of (index, payload, label) in order, loaded): with `cache`, the payloads are
    (image, ok), decoded once (`fill_cache`)."""
    if cache:
        source = fill_cache(source, cache)
    return source, indexed_records(source), bool(cache)


def epoch_records(source, batch_size, steps, seed, epoch, first_step=0, shuffle_buffer=2048, step_numbers=None):
    """Global batches of records (index, payload, label) of steps [first_step, steps) of training epoch
    `epoch`, or of the steps a dataset of `step_numbers` names (a source with random access only).

    The split is read in passes, each a fresh permutation seeded by (seed, pass), and every epoch
    of `steps` batches takes the next slice of one: a full epoch is a pass; short epochs
    (--steps_per_epoch) cover a pass together before the next pass begins. No epoch holds an image
    twice; the N mod (steps x batch) images a pass leaves out change from pass to pass. A source with random
    access (`lookup`) computes each position's record (tf.random.experimental.index_shuffle), so a
    resumed epoch reads nothing before `first_step`; one read in order only (TFDS) reads its files
    shuffled and interleaved by the pass's seed, through a `shuffle_buffer`, and skips what it had
    read.
    """
    per_epoch = steps * batch_size
    if per_epoch > source.num_examples:
        raise UserError(f"an epoch of {steps} steps of {batch_size} takes {per_epoch} images; the split has "
                         f"{source.num_examples}")
    epochs_per_pass = source.num_examples // per_epoch
    pass_number, part = divmod(epoch, epochs_per_pass)
    start, stop = part * per_epoch + first_step * batch_size, (part + 1) * per_epoch
    if source.lookup is None:
        if step_numbers is not None:
            raise UserError("step numbers need a split read by index; this one is read in order")
        pass_seed = seed * 1_000_003 + pass_number
        return indexed_records(source._replace(records=source.shuffled(pass_seed))).shuffle(
            shuffle_buffer, seed=pass_seed).skip(start).take(stop - start).batch(batch_size)
    pass_key = tf.constant([seed, pass_number], tf.int64)
    last = tf.constant(source.num_examples - 1, tf.int64)

    def batch(step):
        positions = part * per_epoch + step * batch_size + tf.range(batch_size, dtype=tf.int64)
        indices = tf.random.experimental.index_shuffle(positions, pass_key, last)
        return (indices, *source.lookup(indices))

    return (tf.data.Dataset.range(first_step, steps) if step_numbers is None else step_numbers).map(batch)


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


def check_trainable(source, name, batch_size, replicas):
    """Refuses, before anything is written, data that cannot train (one clear line)."""
    classes, images = len(source.class_names), source.num_examples
    if classes < 2:
        raise DataError(f"{name} has {classes} class: a classifier needs 2 or more")
    if images < batch_size:
        raise DataError(f"{name} has {images} training images, fewer than one batch of {batch_size}: "
                        "lower --batch_size")
    if not has_readable_image(source):
        raise DataError(f"{name}: no training image could be read (all {images} files are corrupt, empty or "
                        "not images)")
    if batch_size % replicas:
        raise UserError(f"--batch_size {batch_size} does not split evenly over {replicas} replicas")


def epoch_steps(num_examples, batch_size):
    """Training steps in one epoch: every full global batch of the reshuffled split."""
    return num_examples // batch_size


def train_pipeline(source, batch_size, stats, seed=0, epoch=0, first_step=0, steps=None, pca_lighting=True,
                   cache=None, input_context=None, shuffle_buffer=2048, service=None, to_float=True):
    """Steps [first_step, steps) of one training epoch: float32 [b, 227, 227, 3] minus the mean, int32 [b].

    Section 4.1: a random 227x227 crop (all 30x30 offsets equally likely) of the 256x256 image, a
    horizontal flip with probability 0.5, and (pca_lighting) the fancy-PCA lighting change. The mean
    image is subtracted before cropping, so each crop loses its matching patch of the mean.
    The epoch's order is a slice of a permutation of the whole split (`epoch_records`) cut into
    `steps` (default: all) global batches of `batch_size`; an image's crop, flip and lighting come
    from stateless ops keyed by (seed, epoch, image index). So a run resumed at `first_step` sees the
    images it had not seen yet, with the augmentation it would have had.
    to_float=False: the batches stay uint8 to the devices, as `TrainingBatch`es, which `float_images`
        turns into the float32 images on each replica's device (the trainer; a quarter of the bytes).
    input_context: tf.distribute's (distribute_datasets_from_function): this worker's per-replica
        batches, b = batch_size / replicas; otherwise b = batch_size.
    cache: None, "memory" or an .npy file path: decoded 256x256 images are kept after one pass.
    service: (first, last, make) -> the element `make` gives of each step of [first, last), in order
        (data_service.on_service: the decode and augmentation on tf.data service workers). The element
        is this pipeline's share of the step's global batch: batches stay whole.
    """
    steps = epoch_steps(source.num_examples, batch_size) if steps is None else steps
    source, _, loaded = _records(source, cache)

    def augment(index, image, ok, label):
        """The crop and flip in uint8, and what `network_input` needs for the rest: which patch of the mean
        (a crop's flip is the flipped mean's crop at the mirrored column) and the lighting offset."""
        key = tf.random.experimental.stateless_fold_in(tf.constant([seed, epoch], tf.int64), index)
        keys = tf.random.experimental.stateless_split(key, 3)
        top, left = tf.unstack(tf.random.stateless_uniform([2], keys[0], 0, IMAGE_SIZE - CROP_SIZE + 1, tf.int32))
        flip = tf.random.stateless_uniform([], keys[2]) < 0.5
        image = image[top:top + CROP_SIZE, left:left + CROP_SIZE, :]
        image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
        left = tf.where(flip, IMAGE_SIZE - CROP_SIZE - left, left)
        alphas = tf.random.stateless_normal([3], keys[1], stddev=0.1)
        offset = preprocess.lighting_offset(alphas, stats) if pca_lighting else tf.zeros([3])
        return TrainingBatch(tf.ensure_shape(image, [CROP_SIZE, CROP_SIZE, 3]),
                             tf.stack([tf.cast(flip, tf.int32), top, left]), offset, tf.where(ok, label, -1))

    def augmented(batches):  # Global batches of records -> this pipeline's share of each, augmented.
        return _worker_examples(batches, source, loaded, input_context, batch_size).map(augment,
                                                                                        num_parallel_calls=AUTOTUNE)

    replica_batch = _replica_batch_size(input_context, batch_size)
    if service is None:
        batches = epoch_records(source, batch_size, steps, seed, epoch, first_step, shuffle_buffer)
        batches = augmented(batches).batch(replica_batch, drop_remainder=True)
    else:
        share = batch_size // (input_context.num_input_pipelines if input_context else 1)
        batches = service(first_step, steps, lambda step_numbers: augmented(epoch_records(
            source, batch_size, steps, seed, epoch, step_numbers=step_numbers)).batch(share)).rebatch(replica_batch)
    if to_float:
        batches = batches.map(float_images(stats), num_parallel_calls=AUTOTUNE)
    return batches.prefetch(AUTOTUNE)


TrainingBatch = collections.namedtuple("TrainingBatch", ["crops", "patches", "offsets", "labels"])
TrainingBatch.__doc__ = """A training batch as the input pipeline hands it to the devices (to_float=False).

crops: uint8 [b, 227, 227, 3], cropped and flipped; patches: int32 [b, 3], (flipped, top, left) of the
mean image's patch to subtract (of the flipped mean when flipped); offsets: float32 [b, 3], the lighting
change of each image (zeros without it); labels: int32 [b], -1 for an image that failed to load.
"""


def float_images(stats, strategy=None):
    """TrainingBatch -> (float32 images, labels): `network_input` with the stats' mean image and its mirror.
    make_train_loop's `to_network` for `strategy`'s replicas (XLA where they are CPUs), or without one the
    host's (XLA). The means are numpy, so that a graph using them holds them as a constant on its device."""
    means = np.stack([stats.mean_image, stats.mean_image[:, ::-1]])
    jit_compile = strategy is None or all(tf.DeviceSpec.from_string(device).device_type == "CPU"
                                          for device in strategy.extended.worker_devices)
    return lambda batch: network_input(batch, means, jit_compile)


def network_input(batch, means, jit_compile=True):
    """A TrainingBatch -> (float32 images [b, 227, 227, 3], labels): each crop minus its patch of `means`
    (float32 [2, 256, 256, 3]: the mean image, and flipped left-right), plus its lighting offset: the
    float32 sums of the whole image minus the mean, cropped, lit and flipped. jit_compile: as one XLA
    loop, for CPUs (0.18 ms an image on a core; as TensorFlow ops 0.76); off on GPUs, where the ops are
    cheap and XLA would need CUDA's ptxas."""
    return (_network_input_xla if jit_compile else _network_input)(batch, means)


def _network_input(batch, means):
    rows = tf.reshape(means, [2 * IMAGE_SIZE, IMAGE_SIZE, 3])
    flipped, top, left = tf.unstack(batch.patches[:, :, None], axis=1)
    patches = tf.gather(rows, flipped * IMAGE_SIZE + top + tf.range(CROP_SIZE))  # [b, 227, 256, 3]
    patches = tf.gather(patches, left + tf.range(CROP_SIZE), axis=2, batch_dims=1)
    return tf.cast(batch.crops, tf.float32) - patches + batch.offsets[:, None, None], batch.labels


_network_input_xla = tf.function(_network_input, jit_compile=True)


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
    crop = preprocess.ten_crop if ten_crop else center_crop
    mean = crop(tf.constant(stats.mean_image))  # The views' patches of it: images are cropped in uint8.
    source, records, loaded = _records(source, cache if cache == "memory" else None)
    padding = eval_steps(source.num_examples, batch_size) * batch_size - source.num_examples
    blank = tf.nest.map_structure(lambda spec: tf.zeros(spec.shape, spec.dtype), records.element_spec)
    blank = (tf.constant(-1, tf.int64), blank[1], tf.constant(-1, tf.int32))
    batches = records.concatenate(tf.data.Dataset.from_tensors(blank).repeat(padding)).batch(batch_size)
    examples = _worker_examples(batches.take(steps or -1), source, loaded, input_context, batch_size)
    return (examples.map(lambda index, image, ok, label: (tf.cast(crop(image), tf.float32) - mean,
                                                          tf.where(ok & (label >= 0), label, -1)),
                         num_parallel_calls=AUTOTUNE)
            .batch(_replica_batch_size(input_context, batch_size))
            .prefetch(AUTOTUNE))

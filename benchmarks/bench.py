"""benchmarks/bench.py (`make bench`): one markdown table, ours beside a reference per row.

Every row is measured in this one process, ours and the reference in alternating rounds, so compare
ratios, not absolute figures across runs or machines. Every timed function is built once and called
before it is timed (tracing, XLA compilation and kernel caches stay out of the figures). Each bench_*
function appends rows {what, ours, reference, ratio, unit}.

    python benchmarks/bench.py [--data DIR] [--only lrn,training,pipeline,service,loop,export,formats]

--data (default $ALEXNET_DATA, else ../shared/data beside the repository) holds
imagenette2_224_subset and skimage_photos; the rows that need them are skipped, one printed line each,
where they are absent.
"""
import argparse
import datetime
import gc
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from keras_alexnet import data, data_service, distribute, export, lrn, portable, preprocess, sources
from keras_alexnet.benchmark import images_per_second, train_step
from keras_alexnet.config import Config
from keras_alexnet.model import INPUT_SHAPE, OnTower, build_alexnet
from keras_alexnet.step import make_train_loop
from keras_alexnet.trainer import Trainer, set_up_process

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
IMAGENETTE = "imagenette2_224_subset"
GFLOP_PER_IMAGE = 4.35  # Forward and backward pass of one training image.


def _row(what, ours, reference, batch_size, rounds=3):
    """Best-of-`rounds` images/s of two calls measured in turn, so that a busy machine hurts both alike."""
    ours(), reference(), ours(), reference()  # Warm-up: tracing, compilation, kernel caches.
    rates = [(images_per_second(ours, batch_size), images_per_second(reference, batch_size))
             for _ in range(rounds)]
    ours, reference = max(r[0] for r in rates), max(r[1] for r in rates)
    return {"what": what, "ours": round(ours, 1), "reference": round(reference, 1),
            "ratio": round(ours / reference, 2), "unit": "img/s"}


def _imagenette(data_dir, split, rows_name):
    """The Imagenette split folder under `data_dir`, or None (after one printed line) if absent."""
    folder = Path(data_dir) / IMAGENETTE / split if split else Path(data_dir) / IMAGENETTE
    if not folder.is_dir():
        print(f"skipped the {rows_name}: {folder} not found (--data or $ALEXNET_DATA)")
        return None
    return folder


# ----------------------------------------------------------------------------------------- LRN

def bench_lrn(rows, data_dir, shape=(128, 55, 55, 96)):
    """Forward + backward of our LRN against tf.nn.local_response_normalization at conv1's shape.

    Milliseconds per call; ratio = ours / built-in time (target: <= 1.0 with XLA, <= 1.2 without).
    """
    x = tf.random.uniform(shape, 0, 30)
    for jit in (False, True):
        def fwd_bwd(function):
            @tf.function(jit_compile=jit)
            def call(x):
                with tf.GradientTape() as tape:
                    tape.watch(x)
                    y = function(x)
                return tape.gradient(y, x, output_gradients=x)
            return lambda: call(x).numpy()

        # _row measures calls/s x "batch size"; at 1e6 that is 1e6 / seconds per call = 1e3 / ms per call.
        row = _row("", fwd_bwd(lrn.local_response_normalization), fwd_bwd(_builtin_lrn), 10**6)
        ours, builtin = 10**9 / row["ours"], 10**9 / row["reference"]
        rows.append({"what": f"LRN forward+backward {list(shape)}{', XLA' if jit else ''}: ours vs "
                             "tf.nn.local_response_normalization", "ours": round(ours, 1),
                     "reference": round(builtin, 1), "ratio": round(ours / builtin, 2),
                     "unit": "ms (lower is better)"})


def _builtin_lrn(x, depth_radius=2, bias=2.0, alpha=1e-4, beta=0.75):
    return tf.nn.local_response_normalization(x, depth_radius, bias, alpha, beta)


class BuiltinLRN(lrn.LocalResponseNormalization):
    """The paper's LRN layer computed by tf.nn.local_response_normalization (autodiff gradient)."""

    def call(self, inputs):
        return _builtin_lrn(inputs, self.depth_radius, self.bias, self.alpha, self.beta)


# ----------------------------------------------------------------------------------------- training

def _single_tower_reference(num_classes):
    """A plain single-tower Keras AlexNet: Conv2D(groups=2) for the towers, the built-in LRN."""
    layers = keras.layers
    x = inputs = keras.Input(INPUT_SHAPE)
    x = layers.MaxPooling2D(3, 2)(BuiltinLRN()(layers.Conv2D(96, 11, 4, activation="relu")(x)))
    x = layers.MaxPooling2D(3, 2)(BuiltinLRN()(layers.Conv2D(256, 5, padding="same", groups=2, activation="relu")(x)))
    x = layers.Conv2D(384, 3, padding="same", activation="relu")(x)
    x = layers.Conv2D(384, 3, padding="same", groups=2, activation="relu")(x)
    x = layers.MaxPooling2D(3, 2)(layers.Conv2D(256, 3, padding="same", groups=2, activation="relu")(x))
    x = layers.Flatten()(x)
    for _ in range(2):
        x = layers.Dropout(0.5)(layers.Dense(4096, activation="relu")(x))
    return keras.Model(inputs, layers.Dense(num_classes, activation="softmax")(x))


def _with_builtin_lrn(model):
    """A copy of a build_alexnet model (new weights) whose LRN layers use the tf.nn op."""
    def clone(layer):
        if isinstance(layer, OnTower) and type(layer.layer) is lrn.LocalResponseNormalization:
            return OnTower(BuiltinLRN.from_config(layer.layer.get_config()), layer.tower, layer.tower_devices)
        return layer.__class__.from_config(layer.get_config())
    return keras.models.clone_model(model, clone_function=clone)


def _tape_step(model, jit):
    """A plain GradientTape SGD step (momentum 0.9): the reference's training step, built once."""
    optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
    optimizer.build(model.trainable_variables)

    @tf.function(jit_compile=jit)
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, model(x, training=True)))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss
    return lambda images, labels: step(images, labels).numpy()


def _our_step(plan, batch_size, num_classes=1000, builtin_lrn=False):
    """Our training step (benchmark.train_step) on `plan`, optionally with the LRN layers swapped for the tf.nn op."""
    return train_step(plan, Config(batch_size=batch_size), num_classes,
                      rebuild=_with_builtin_lrn if builtin_lrn else None)


def _matmul_ceiling():
    """float32 GFLOP/s of a 4096^2 matmul: divided by GFLOP_PER_IMAGE, the training img/s ceiling."""
    a = tf.random.normal([4096, 4096])
    matmul = tf.function(lambda: tf.matmul(a, a))
    matmul().numpy()  # Traces.
    rate = max(images_per_second(lambda: matmul().numpy(), 1, seconds=3) for _ in range(2))
    return rate * 2 * 4096 ** 3 / 1e9


def bench_training(rows, data_dir, batch_size=128):
    """Training images/s: our two-tower model and step against plain Keras references."""
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    batch = (tf.random.normal([batch_size, *INPUT_SHAPE], stddev=50.0),
             tf.random.uniform([batch_size], 0, 1000, tf.int32))
    prefix = f"training, batch {batch_size}"
    for jit in (False, True):
        ours, reference = _tape_step(build_alexnet(1000, seed=0), jit), _tape_step(_single_tower_reference(1000), jit)
        rows.append(_row(f"{prefix}{', XLA' if jit else ''}, plain GradientTape step of each: two towers (ours) vs "
                         "single tower with Conv2D(groups=2) + tf.nn LRN", lambda: ours(*batch),
                         lambda: reference(*batch), batch_size))
    ours = reference = None  # Frees the models (about 1 GB each with their optimizers).
    one_device = {cpus[0]: [cpus[0], cpus[0]]}
    ours, plain = _our_step(one_device, batch_size), _tape_step(build_alexnet(1000, seed=0), False)
    rows.append(_row(f"{prefix}: our step (MirroredStrategy, tf.gradients, weight decay) vs a plain "
                     "GradientTape step of the same model", lambda: ours(*batch), lambda: plain(*batch), batch_size))
    plain = None
    builtin = _our_step(one_device, batch_size, builtin_lrn=True)
    rows.append(_row(f"{prefix}: our LRN vs tf.nn LRN in the same two-tower model and step",
                     lambda: ours(*batch), lambda: builtin(*batch), batch_size))
    builtin = None
    split = _our_step({cpus[0]: cpus[:2]}, batch_size)
    rows.append(_row(f"{prefix}: towers on 2 logical CPUs vs both towers on one", lambda: split(*batch),
                     lambda: ours(*batch), batch_size))
    ours = None
    replicas = _our_step({cpus[0]: cpus[0:4:2], cpus[1]: cpus[1:4:2]}, batch_size)
    rows.append(_row(f"{prefix}: 2 replicas x 2 towers vs 1 replica x 2 towers, 4 logical CPUs on the same "
                     "cores (the ratio is the overhead)", lambda: replicas(*batch), lambda: split(*batch),
                     batch_size))
    replicas = split = None
    best = max(row["ours"] for row in rows if row["what"].startswith(prefix) and "XLA" not in row["what"])
    gflops = _matmul_ceiling()
    ceiling = gflops / GFLOP_PER_IMAGE
    rows.append({"what": f"training (best row above) vs the float32 ceiling ({gflops:.0f} GFLOP/s 4096^2 "
                         f"matmul / {GFLOP_PER_IMAGE} GFLOP per image)", "ours": best,
                 "reference": round(ceiling, 1), "ratio": round(best / ceiling, 2), "unit": "img/s"})


def bench_loop(rows, data_dir, batch_size=64, steps=40, loop_steps=3):
    """The whole training loop (Trainer.fit on Imagenette held in memory) against its bare step.

    The loop's img/s is what its progress line reports: the steps of the epoch after the first loop
    (which traces), with the input pipeline, the host's reads and the summaries, without the
    epoch-end validation and checkpoint. The bare step is the same model (10 classes), step and
    device plan on one fixed batch, timed just before and after each loop run (the better of the
    two is the reference). Target: ratio >= 0.95. Those two rows do not alternate, so a machine whose
    load changes skews them; a third row does: `make_train_loop` fed by the training pipeline
    (640 Imagenette images from the memory cache), `loop_steps` steps a call, against as many bare steps.
    """
    folder = _imagenette(data_dir, None, "loop rows")
    if folder is None:
        return
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    plan = {cpus[0]: cpus[:2]}
    batch = (tf.random.normal([batch_size, *INPUT_SHAPE], stddev=50.0), tf.random.uniform([batch_size], 0, 10, tf.int32))
    bare = _our_step(plan, batch_size, num_classes=10)
    bare(*batch)  # Traces.

    def bare_speed():
        return images_per_second(lambda: bare(*batch), batch_size, seconds=8)

    before = bare_speed()
    for loop in (1, 10):
        with tempfile.TemporaryDirectory() as model_dir:
            config = Config(dataset=str(folder), batch_size=batch_size, epochs=1, steps_per_epoch=steps,
                            eval_steps=1, cache="memory", model_dir=model_dir, steps_per_loop=loop, seed=0)
            set_up_process(config)
            trainer = Trainer(config, distribute.mirrored_strategy(list(plan)), plan)
            trainer.fit()
            speed = trainer.progress.speed  # The epoch's img/s, as history.jsonl records it.
        after = bare_speed()
        reference, before = max(before, after), after
        rows.append({"what": f"training loop, batch {batch_size}, --steps_per_loop={loop} ({IMAGENETTE} in memory) "
                             "vs its bare step on a fixed batch", "ours": round(speed, 1),
                     "reference": round(reference, 1), "ratio": round(speed / reference, 2), "unit": "img/s"})
    full = sources.load_source(str(folder), "train")
    source = sources.head(full, 640)
    stats = preprocess.Stats.imagenet()
    iterator = iter(bare.strategy.distribute_datasets_from_function(lambda context: data.train_pipeline(
        source, batch_size, stats, cache="memory", input_context=context, to_float=False).repeat()))
    loop = make_train_loop(bare.strategy, bare.replica_step, tf.Variable(0, dtype=tf.int64),
                           data.float_images(stats, bare.strategy))  # As the trainer feeds it.
    rows.append(_row(f"make_train_loop, batch {batch_size}, {loop_steps} steps a call on the training "
                     "pipeline (640 images in memory) vs as many bare steps, alternating",
                     lambda: loop(iterator, tf.constant(loop_steps)).numpy(),
                     lambda: [bare(*batch) for _ in range(loop_steps)], batch_size * loop_steps, rounds=2))


# ----------------------------------------------------------------------------------------- data and serving

def _in_fixed_order(source):
    """`source` read in its fixed order through a shuffle buffer: the epoch order before the
    permutations (data.epoch_records's path for sources without random access)."""
    return source._replace(lookup=None, shuffled=lambda seed: source.records)


PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg")  # In skimage_photos: 451 x 300 to 640 x 427.


def _jpeg_folders(data_dir, root, count=48):
    """Class folders of JPEGs (quality 95) under root/originals, ImageNet's size: crops of 90-100% of each
    side of the shared photos, every other one mirrored; and under root/prepared, each of them as
    `python -m keras_alexnet.prepare` stores it (256 x 256, no chroma subsampling). None if absent."""
    from PIL import Image
    photos = [Path(data_dir) / "skimage_photos" / name for name in PHOTOS]
    if not all(photo.exists() for photo in photos):
        print(f"skipped the per-stage pipeline rows: {photos[0].parent} not found (--data or $ALEXNET_DATA)")
        return None
    photos, rng = [Image.open(photo).convert("RGB") for photo in photos], np.random.default_rng(0)
    for i in range(count):
        photo = photos[i % len(photos)]
        (width, height), (kept_w, kept_h) = photo.size, rng.uniform(0.9, 1, 2)
        x, y = rng.integers(0, [width * (1 - kept_w) + 1, height * (1 - kept_h) + 1])
        image = photo.crop((x, y, x + int(width * kept_w), y + int(height * kept_h)))
        original, prepared = (Path(root) / kind / f"c{i % 2}" / f"{i}.jpg" for kind in ("originals", "prepared"))
        for path in (original, prepared):
            path.parent.mkdir(parents=True, exist_ok=True)
        (image.transpose(Image.FLIP_LEFT_RIGHT) if i % 2 else image).save(original, quality=95)
        resized = preprocess.decode_and_resize(original.read_bytes())
        prepared.write_bytes(tf.io.encode_jpeg(resized, quality=95, chroma_downsampling=False).numpy())
    return {kind: Path(root) / kind for kind in ("originals", "prepared")}


def _one_core():
    """tf.data options that run a pipeline on one thread (its own pool of 1, no intra-op threads)."""
    options = tf.data.Options()
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
    return options


def _per_core(dataset):
    """A call -> images per CPU second of one pass of `dataset` (of images, or of batches) on one thread:
    what a core does, whatever else the machine runs. Built (traced) once."""
    dataset = dataset.with_options(_one_core())
    batched = tf.nest.flatten(dataset.element_spec)[0].shape.rank == 4
    size = (lambda x: tf.shape(x, tf.int64)[0]) if batched else (lambda x: tf.constant(1, tf.int64))
    count = tf.function(lambda: dataset.reduce(tf.constant(0, tf.int64),
                                               lambda n, x: n + size(tf.nest.flatten(x)[0])))

    def call():
        start = time.process_time()
        images = int(count())
        return images / (time.process_time() - start)
    return call


def _pipeline_stages(rows, data_dir, images=960, rounds=3):
    """Images per core of each stage of the training input (issue 24's table), beside decoding alone:
    on originals of ImageNet's size (from the shared photos), on the same photos as 256 x 256 JPEG files,
    and on those photos `prepare`d (array_record, decoded as `sources.decode_prepared` does).

    Stages, each `images` images (the files repeated): tf.io.decode_jpeg alone (the reference: the
    libjpeg-turbo limit), preprocess.decode_and_resize (header checks, Exif, section 2's rescale and crop),
    the whole data.train_pipeline (reading, decoding, section 4.1's augmentation, batches of 32) as float32
    images and as the trainer takes it (uint8 crops, made float32 on the devices by data.network_input).
    Measured on one thread in alternating rounds, best of `rounds`; ratio = stage / decode alone.
    """
    with tempfile.TemporaryDirectory() as root:
        folders = _jpeg_folders(data_dir, root)
        if folders is None:
            return
        subprocess.run([sys.executable, "-m", "keras_alexnet.prepare", f"--dataset={folders['originals']}",
                        f"--output={root}/dataset", "--splits=train", "--processes=1"], check=True,
                       stdout=subprocess.DEVNULL)
        stats = preprocess.Stats.imagenet()

        def trainers(source):  # The whole pipeline, as float32 images and as the trainer takes it.
            repeated = sources.random_access(images, lambda i: source.lookup(i % source.num_examples),
                                             source.load, source.class_names)
            return {"data.train_pipeline": data.train_pipeline(repeated, 32, stats),
                    "data.train_pipeline, uint8 to the devices (the trainer's)": data.train_pipeline(
                        repeated, 32, stats, to_float=False)}

        for kind, folder in folders.items():
            source = sources.load_source(str(folder), "train", val_fraction=0.0)
            files = tf.constant([path.read_bytes() for path in sorted(folder.glob("*/*.jpg"))])
            encoded = tf.data.Dataset.from_tensor_slices(files).repeat(images // len(files))
            stages = {"tf.io.decode_jpeg alone": encoded.map(lambda data: tf.io.decode_jpeg(data, channels=3)),
                      "preprocess.decode_and_resize": encoded.map(preprocess.decode_and_resize), **trainers(source)}
            if kind == "prepared":
                stages.update({f"{what} of a prepare'd dataset": pipeline for what, pipeline in
                               trainers(sources.load_source(f"{root}/dataset", "train")).items()})
            calls = {what: _per_core(dataset) for what, dataset in stages.items()}
            for call in calls.values():
                call()  # Traces, warms up.
            best = {what: max(rates) for what, rates in zip(calls, zip(*[
                [call() for call in calls.values()] for _ in range(rounds)]))}
            reference = best["tf.io.decode_jpeg alone"]
            for what, rate in best.items():
                rows.append({"what": f"{what} per core, {kind} ({len(files)} JPEGs q95"
                                     f"{', 256 x 256' if kind == 'prepared' else ', 405 x 270 to 640 x 427'}) "
                                     "vs tf.io.decode_jpeg alone", "ours": round(rate, 1),
                             "reference": round(reference, 1), "ratio": round(rate / reference, 2),
                             "unit": "img/s/core"})


def bench_input_pipeline(rows, data_dir):
    """Training-pipeline throughput (section 4.1 augmentation, batch 50) on 1,000 Imagenette JPEGs.

    One pass decoding every JPEG: ours (each epoch a permutation of the split) against the same
    pipeline reading the split in a fixed order through a 2,048-image shuffle buffer, as before. Then the order alone at ImageNet's size: a 1,000,000-record index source, the time from
    the iterator's creation to the first batch of 128, at epoch 0 and resumed at step 5,000. First, the
    rows per stage and per core (`_pipeline_stages`).
    """
    _pipeline_stages(rows, data_dir)
    folder = _imagenette(data_dir, "train", "input pipeline rows")
    if folder is not None:
        count, batch_size = 1000, 50
        source = sources.head(sources.load_source(str(folder), "train", val_fraction=0.0), count)
        stats, cores = preprocess.Stats.imagenet(), len(os.sched_getaffinity(0))

        def one_pass(source, cache):
            batches = data.train_pipeline(source, batch_size, stats, cache=cache).take(count // batch_size)
            start = time.perf_counter()
            for _ in batches:
                pass
            return count / (time.perf_counter() - start)

        # With cache="memory" both sides would read the cache by index (a cache has random access now).
        for cache, what in [(None, "decode every JPEG")]:
            one_pass(source, cache), one_pass(_in_fixed_order(source), cache)  # Fills caches, warms up.
            rates = [(one_pass(source, cache), one_pass(_in_fixed_order(source), cache)) for _ in range(2)]
            ours, reference = max(r[0] for r in rates), max(r[1] for r in rates)
            rows.append({"what": f"train_pipeline per core ({cores} cores), {what}: a permutation an epoch vs a "
                                 "2,048 buffer over a fixed order", "ours": round(ours / cores, 1),
                         "reference": round(reference / cores, 1), "ratio": round(ours / reference, 2),
                         "unit": "img/s/core"})
    index = sources.index_source(1_000_000)
    for first_step in (0, 5000):
        def first_batch(source):
            start = time.perf_counter()
            next(iter(data.epoch_records(source, 128, 7812, 0, 0, first_step)))  # Global batches already.
            return time.perf_counter() - start

        first_batch(index), first_batch(_in_fixed_order(index))  # Warm-up.
        ours, reference = min(first_batch(index) for _ in range(3)), first_batch(_in_fixed_order(index))
        rows.append({"what": f"1,000,000-record index source: iterator to first batch of 128, step {first_step}: "
                             "a permutation vs a buffer over a fixed order", "ours": round(ours, 3),
                     "reference": round(reference, 3), "ratio": round(ours / reference, 3), "unit": "s"})


def bench_data_service(rows, data_dir, count=640, batch_size=64):
    """The whole training pipeline on this host's cores, through TensorFlow's tf.data service (a
    dispatcher and 2 workers in this process, on 127.0.0.1) against the local pipeline, alternating, both
    as the trainer takes them (uint8 crops): the ratio is the service's overhead (gRPC on the same cores)."""
    folder = _imagenette(data_dir, "train", "tf.data service row")
    if folder is None:
        return
    service = tf.data.experimental.service
    dispatcher = service.DispatchServer()
    workers = [service.WorkerServer(service.WorkerConfig(dispatcher.target.removeprefix("grpc://")))
               for _ in range(2)]
    source = sources.head(sources.load_source(str(folder), "train", val_fraction=0.0), count)
    stats, steps = preprocess.Stats.imagenet(), count // batch_size

    def one_pass(on_service=None):
        batches = data.train_pipeline(source, batch_size, stats, steps=steps, service=on_service, to_float=False)
        start = time.perf_counter()
        for _ in batches:
            pass
        return count / (time.perf_counter() - start)

    served = data_service.on_service(dispatcher.target)
    try:
        one_pass(), one_pass(served)  # Warm-up: traces, the file cache.
        rates = [(one_pass(served), one_pass()) for _ in range(2)]
    finally:
        for server in workers + [dispatcher]:
            server.stop()
    ours, reference = max(r[0] for r in rates), max(r[1] for r in rates)
    rows.append({"what": f"train_pipeline on {len(os.sched_getaffinity(0))} cores ({count} Imagenette JPEGs, "
                         "batch 64): through tf.data service, 2 workers on this host, vs local",
                 "ours": round(ours, 1), "reference": round(reference, 1), "ratio": round(ours / reference, 2),
                 "unit": "img/s"})


def bench_export(rows, data_dir):
    """The exported SavedModel (1000 classes) against the Keras model's predict_on_batch.

    serving_default at batch 1 and 64 (mean subtraction, top-5 and labels included in ours), and
    predict_images on 64 real JPEGs against decode_and_resize + centre crop + Keras in eager.
    """
    model = build_alexnet(1000, seed=0)
    stats = preprocess.Stats.imagenet()
    mean = preprocess.center_crop(tf.constant(stats.mean_image))
    with tempfile.TemporaryDirectory() as tmp:
        path = export.export_saved_model(model, [str(i) for i in range(1000)], stats, tmp, 1)
        signatures = tf.saved_model.load(path).signatures
    predict, predict_images = signatures["serving_default"], signatures["predict_images"]
    pixels = tf.constant(np.random.default_rng(0).uniform(0, 255, (64, *INPUT_SHAPE)).astype(np.float32))
    for batch_size in (1, 64):
        images = pixels[:batch_size]
        centred = images - mean
        rows.append(_row(f"SavedModel serving_default vs Keras predict_on_batch, batch {batch_size}",
                         lambda: predict(images=images)["probabilities"].numpy(),
                         lambda: model.predict_on_batch(centred), batch_size))

    folder = _imagenette(data_dir, "val", "predict_images row")
    jpegs = sorted(folder.glob("*/*.JPEG"))[::15][:64] if folder else []
    if len(jpegs) < 64:
        if folder:
            print(f"skipped the predict_images row: fewer than 64 JPEGs under {folder}")
        return
    encoded = tf.constant([p.read_bytes() for p in jpegs])

    def keras_on_bytes():
        crops = preprocess.center_crop(tf.stack([preprocess.decode_and_resize(e) for e in encoded]))
        return model.predict_on_batch(tf.cast(crops, tf.float32) - mean)

    rows.append(_row("SavedModel predict_images (64 Imagenette JPEGs) vs eager decode + Keras",
                     lambda: predict_images(image_bytes=encoded)["probabilities"].numpy(), keras_on_bytes,
                     len(jpegs)))


def _latency(call, calls=200):
    """(p50, p99) in ms of `call`, timed one call at a time after 10 untimed ones."""
    for _ in range(10):
        call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(1000 * (time.perf_counter() - start))
    return np.percentile(times, 50), np.percentile(times, 99)


def bench_formats(rows, data_dir, calibration=64):
    """The export's formats (keras_alexnet.portable; 1000 classes, random weights) against the SavedModel's
    serving_default on the same pixels: batch-1 latency p50 and p99 over 200 calls, batch-32 img/s. LiteRT
    runs XNNPACK and onnxruntime its CPU provider, both with threads = cores; int8 is calibrated on
    `calibration` ImageNette training images (the count does not change the speed)."""
    folder = _imagenette(data_dir, None, "export formats rows")
    if folder is None:
        return
    model, stats = build_alexnet(1000, seed=0), preprocess.Stats.imagenet()
    images = np.random.default_rng(0).uniform(0, 255, (32, *INPUT_SHAPE)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = export.export_saved_model(model, [str(i) for i in range(1000)], stats, tmp, 1, formats=portable.FORMATS,
                                         calibration=portable.calibration_images(str(folder), None, calibration))
        serving = tf.saved_model.load(path).signatures["serving_default"]
        runs = {"TF SavedModel serving_default": lambda x: serving(images=tf.constant(x))["probabilities"].numpy()}
        runs.update({f"{name} ({portable.FILES[name]})": portable.runtime(os.path.join(path, portable.FILES[name]))
                     for name in portable.FILES})
        reference = None
        for what, run in runs.items():
            p50, p99 = _latency(lambda: run(images[:1]))
            run(images), run(images)
            speed = images_per_second(lambda: run(images), len(images))
            reference = reference or (p50, p99, speed)
            rows.append({"what": f"{what}, batch 1 latency p50 vs the SavedModel's", "ours": round(p50, 2),
                         "reference": round(reference[0], 2), "ratio": round(p50 / reference[0], 2), "unit": "ms"})
            rows.append({"what": f"{what}, batch 1 latency p99 vs the SavedModel's", "ours": round(p99, 2),
                         "reference": round(reference[1], 2), "ratio": round(p99 / reference[1], 2), "unit": "ms"})
            rows.append({"what": f"{what}, batch 32 vs the SavedModel's", "ours": round(speed, 1),
                         "reference": round(reference[2], 1), "ratio": round(speed / reference[2], 2),
                         "unit": "img/s"})


# ----------------------------------------------------------------------------------------- the table

BENCHES = {"lrn": bench_lrn, "training": bench_training, "pipeline": bench_input_pipeline,
           "service": bench_data_service, "loop": bench_loop, "export": bench_export, "formats": bench_formats}


def cpu_model():
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                    platform.processor())


def _run(name, rows, data_dir):
    """Runs one benchmark; a failure prints one line and does not hide the other rows."""
    started = time.perf_counter()
    try:
        BENCHES[name](rows, data_dir)
    except Exception as error:
        print(f"bench_{name} failed: {' '.join(str(error).split())[:300]}")
    finally:
        keras.backend.clear_session(free_memory=True)  # About 1 GB a model with its optimizer.
        gc.collect()
        print(f"bench_{name}: {time.perf_counter() - started:.0f} s", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get("ALEXNET_DATA", str(DEFAULT_DATA)),
                        help=f"folder holding {IMAGENETTE} (default: $ALEXNET_DATA, else {DEFAULT_DATA})")
    parser.add_argument("--only", default=",".join(BENCHES), help="comma-separated benchmarks to run")
    args = parser.parse_args()
    distribute.split_cpu(4)  # Logical CPUs: the cost of towers and replicas.
    rows = []
    for name in args.only.split(","):
        _run(name, rows, args.data)
    print(f"\n{cpu_model()}, {len(os.sched_getaffinity(0))} cores; TensorFlow {tf.__version__}, "
          f"Keras {keras.__version__}; {datetime.date.today().isoformat()}\n")
    print("| what | ours | reference | ratio | unit |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['what']} | {row['ours']} | {row['reference']} | {row['ratio']} | {row['unit']} |")


if __name__ == "__main__":
    main()

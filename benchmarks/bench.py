"""python -m keras_alexnet.bench (`make bench`): one markdown table, ours beside a reference per row.

Every row is measured in this one process, ours and the reference in alternating rounds, so compare
ratios, not absolute figures across machines. Each bench_* function appends rows
{what, ours, reference, ratio, unit}.
"""
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from keras_alexnet import data, export, lrn, train
from keras_alexnet.config import Config
from keras_alexnet.model import INPUT_SHAPE, build_alexnet

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _images_per_second(call, batch_size, seconds=1.5, min_calls=2):
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < seconds:
        call()
        calls += 1
    return batch_size * calls / (time.perf_counter() - start)


def _row(what, ours, reference, batch_size, rounds=3):
    """Best-of-`rounds` images/s of two calls measured in turn, so that a busy machine hurts both alike."""
    ours(), reference(), ours(), reference()  # Warm-up: tracing, kernel caches.
    rates = [(_images_per_second(ours, batch_size), _images_per_second(reference, batch_size))
             for _ in range(rounds)]
    ours, reference = max(r[0] for r in rates), max(r[1] for r in rates)
    return {"what": what, "ours": round(ours, 1), "reference": round(reference, 1),
            "ratio": round(ours / reference, 2), "unit": "img/s"}


def bench_export(rows):
    """The exported SavedModel (1000 classes) against the Keras model's predict_on_batch.

    serving_default at batch 1 and 64 (mean subtraction, top-5 and labels included in ours), and
    predict_images on 64 real JPEGs against decode_and_resize + centre crop + Keras in eager.
    """
    model = build_alexnet(1000, seed=0)
    stats = data.Stats.imagenet()
    mean = data.center_crop(tf.constant(stats.mean_image))
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

    jpegs = sorted((SHARED_DATA / "imagenette2_224_subset" / "val").glob("*/*.JPEG"))[::15][:64]
    if len(jpegs) < 64:
        print(f"skipped the predict_images row: fewer than 64 JPEGs under {SHARED_DATA}/imagenette2_224_subset/val")
        return rows
    encoded = tf.constant([p.read_bytes() for p in jpegs])

    def keras_on_bytes():
        crops = data.center_crop(tf.stack([data.decode_and_resize(e) for e in encoded]))
        return model.predict_on_batch(tf.cast(crops, tf.float32) - mean)

    rows.append(_row("SavedModel predict_images (64 Imagenette JPEGs) vs eager decode + Keras",
                     lambda: predict_images(image_bytes=encoded)["probabilities"].numpy(), keras_on_bytes,
                     len(jpegs)))
    return rows


def bench_input_pipeline(rows, reference=None):
    """Training-pipeline throughput (section 4.1 augmentation, batch 50) on 1,000 Imagenette JPEGs.

    One pass decoding every JPEG (no cache), then a pass reading the decoded images from
    cache="memory" (after a pass that filled it). Both include the shuffle buffer's filling. Rows in
    images/s and images/s per core; `reference` (images/s, e.g. the model's training throughput)
    gives them a ratio, else reference and ratio are None.
    """
    folder = SHARED_DATA / "imagenette2_224_subset" / "train"
    if not folder.is_dir():
        print(f"skipped the input pipeline rows: {folder} not found")
        return rows
    count, batch_size = 1000, 50
    full = data.load_source(str(folder), "train", val_fraction=0.0)
    source = data.Source(full.records.take(count), full.load, full.class_names, count)
    stats, cores = data.Stats.imagenet(), len(os.sched_getaffinity(0))

    def one_pass(cache):
        batches = data.train_pipeline(source, batch_size, stats, cache=cache).take(count // batch_size)
        start = time.perf_counter()
        for _ in batches:
            pass
        return count / (time.perf_counter() - start)

    one_pass("memory")  # Fills the cache.
    for what, speed in [("decode every JPEG", one_pass(None)), ('cache="memory", second pass', one_pass("memory"))]:
        for suffix, ours in [("", speed), (f" per core ({cores} cores)", speed / cores)]:
            ref = reference and reference / (cores if suffix else 1)
            rows.append({"what": f"train_pipeline images/s{suffix}, {what}", "ours": round(ours, 1),
                         "reference": ref and round(ref, 1), "ratio": ref and round(ours / ref, 2),
                         "unit": "img/s" + ("/core" if suffix else "")})
    return rows


def bench_lrn(rows, shape=(128, 55, 55, 96)):
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
        row = _row("", fwd_bwd(lrn.local_response_normalization),
                   fwd_bwd(lambda t: tf.nn.local_response_normalization(t, 2, 2.0, 1e-4, 0.75)), 10**6)
        ours, builtin = 10**9 / row["ours"], 10**9 / row["reference"]
        rows.append({"what": f"LRN forward+backward {list(shape)}{', XLA' if jit else ''}: ours vs "
                             "tf.nn.local_response_normalization", "ours": round(ours, 1),
                     "reference": round(builtin, 1), "ratio": round(ours / builtin, 2),
                     "unit": "ms (lower is better)"})
    return rows


def _single_tower_reference(num_classes):
    """A plain single-tower Keras AlexNet: Conv2D(groups=2) for the towers, the built-in LRN."""
    layers = keras.layers

    def norm(x):
        return layers.Lambda(lambda t: tf.nn.local_response_normalization(t, 2, 2.0, 1e-4, 0.75))(x)

    x = inputs = keras.Input(INPUT_SHAPE)
    x = layers.MaxPooling2D(3, 2)(norm(layers.Conv2D(96, 11, 4, activation="relu")(x)))
    x = layers.MaxPooling2D(3, 2)(norm(layers.Conv2D(256, 5, padding="same", groups=2, activation="relu")(x)))
    x = layers.Conv2D(384, 3, padding="same", activation="relu")(x)
    x = layers.Conv2D(384, 3, padding="same", groups=2, activation="relu")(x)
    x = layers.MaxPooling2D(3, 2)(layers.Conv2D(256, 3, padding="same", groups=2, activation="relu")(x))
    x = layers.Flatten()(x)
    for _ in range(2):
        x = layers.Dropout(0.5)(layers.Dense(4096, activation="relu")(x))
    return keras.Model(inputs, layers.Dense(num_classes, activation="softmax")(x))


def _tape_step(model, jit):
    """A plain GradientTape SGD step (momentum 0.9), the reference's training step."""
    optimizer = keras.optimizers.SGD(0.01, momentum=0.9)

    @tf.function(jit_compile=jit)
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, model(x, training=True)))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))
        return loss
    return step


def _new_strategy(devices):
    # Strategies of one process must not share collective group keys (as TensorFlow's own tests).
    tf.distribute.MirroredStrategy._collective_key_base += 100_000
    return tf.distribute.MirroredStrategy(devices)


def _our_step(devices, jit, batch_size, builtin_lrn=False, plan=None):
    """Our training step (train.make_train_step) on one replica with towers on `devices`, or on the
    replicas of `plan` ({replica device: [tower A, tower B]})."""
    plan = plan or {devices[0]: devices}
    strategy = _new_strategy(list(plan))
    with strategy.scope():
        model = build_alexnet(1000, tower_devices=plan, seed=0)
        optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
        optimizer.build(model.trainable_variables)
    step = train.make_train_step(strategy, model, optimizer, Config(batch_size=batch_size, jit_compile=jit))
    if builtin_lrn:  # The same model and step with the built-in LRN op.
        original = lrn.local_response_normalization
        lrn.local_response_normalization = lambda t, *args: tf.nn.local_response_normalization(t, *args)
        step.get_concrete_function(tf.TensorSpec([batch_size, *INPUT_SHAPE]), tf.TensorSpec([batch_size], tf.int32))
        lrn.local_response_normalization = original
    return step


def _matmul_ceiling():
    """float32 GFLOP/s of a 4096^2 matmul: with 4.35 GFLOP per training image, the img/s ceiling."""
    a = tf.random.normal([4096, 4096])
    matmul = tf.function(lambda: tf.matmul(a, a))
    rate = _images_per_second(lambda: matmul().numpy(), 1, seconds=3)
    return rate * 2 * 4096 ** 3 / 1e9


def bench_training(rows, batch_size=128):
    """Training images/s: our two-tower model against plain Keras references, in the same process."""
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    images = tf.random.normal([batch_size, *INPUT_SHAPE], stddev=50.0)
    labels = tf.random.uniform([batch_size], 0, 1000, tf.int32)
    one_device = [cpus[0], cpus[0]]
    reference = _single_tower_reference(1000)
    for jit in (False, True):
        ours = _our_step(one_device, jit, batch_size)
        reference_step = _tape_step(reference, jit)  # Built once: a rebuilt step times tracing.
        row = _row(f"training, batch {batch_size}{', XLA' if jit else ''}: two towers (ours) vs single-tower "
                   "Conv2D(groups=2) + tf.nn LRN", lambda: ours(images, labels)[0].numpy(),
                   lambda: reference_step(images, labels).numpy(), batch_size, rounds=2)
        rows.append(row)
    ours, builtin = _our_step(one_device, False, batch_size), _our_step(one_device, False, batch_size, True)
    plain = _tape_step(build_alexnet(1000, seed=0), False)
    rows.append(_row(f"training, batch {batch_size}: our step (MirroredStrategy, tf.gradients) vs a plain "
                     "GradientTape step of the same model", lambda: ours(images, labels)[0].numpy(),
                     lambda: plain(images, labels).numpy(), batch_size, rounds=2))
    rows.append(_row(f"training, batch {batch_size}: our LRN vs tf.nn LRN in the same two-tower model",
                     lambda: ours(images, labels)[0].numpy(), lambda: builtin(images, labels)[0].numpy(),
                     batch_size, rounds=2))
    split = _our_step(cpus[:2], False, batch_size)
    rows.append(_row(f"training, batch {batch_size}: towers on 2 logical CPUs vs both towers on one",
                     lambda: split(images, labels)[0].numpy(),
                     lambda: ours(images, labels)[0].numpy(), batch_size, rounds=2))
    replicas = _our_step(None, False, batch_size, plan={cpus[0]: cpus[0:4:2], cpus[1]: cpus[1:4:2]})
    rows.append(_row(f"training, batch {batch_size}: 2 replicas x 2 towers vs 1 replica x 2 towers, 4 logical "
                     "CPUs on the same cores (the ratio is the overhead)", lambda: replicas(images, labels)[0].numpy(),
                     lambda: split(images, labels)[0].numpy(), batch_size, rounds=2))
    ours_speed = max(row["ours"] for row in rows
                     if row["what"].startswith("training, batch") and "XLA" not in row["what"])
    gflops = _matmul_ceiling()
    ceiling = gflops / 4.35
    rows.append({"what": f"training (best row above) vs the float32 ceiling ({gflops:.0f} GFLOP/s 4096^2 "
                         "matmul / 4.35 GFLOP per image)", "ours": ours_speed, "reference": round(ceiling, 1),
                 "ratio": round(ours_speed / ceiling, 2), "unit": "img/s"})
    return ours_speed


def bench_loop(rows, batch_size=64, steps=24):
    """The whole training loop (train.train on ImageNette held in memory) against its bare step.

    The loop's img/s is what its progress line reports: the steps of the epoch after the first loop
    (which traces), with the input pipeline, the host's reads and the summaries, without the
    epoch-end validation. The bare step runs on one fixed batch. Target: ratio >= 0.95.
    """
    folder = SHARED_DATA / "imagenette2_224_subset"
    if not folder.is_dir():
        print(f"skipped the loop rows: {folder} not found")
        return rows
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    images = tf.random.normal([batch_size, *INPUT_SHAPE], stddev=50.0)
    labels = tf.random.uniform([batch_size], 0, 10, tf.int32)
    bare = _our_step(cpus[:2], False, batch_size)
    bare(images, labels)  # Traces.
    bare_speed = max(_images_per_second(lambda: bare(images, labels)[0].numpy(), batch_size, seconds=5)
                     for _ in range(2))
    for loop in (1, 10):
        with tempfile.TemporaryDirectory() as model_dir:
            config = Config(dataset=str(folder), batch_size=batch_size, epochs=1, steps_per_epoch=steps,
                            eval_steps=1, cache="memory", model_dir=model_dir, steps_per_loop=loop, seed=0)
            train.train(config, _new_strategy(cpus[:1]), {cpus[0]: cpus[:2]})
            with open(os.path.join(model_dir, train.HISTORY)) as f:
                speed = [json.loads(line) for line in f][-1]["images_per_second"]
        rows.append({"what": f"training loop, batch {batch_size}, --steps_per_loop={loop} (ImageNette in memory) "
                             "vs its bare step on a fixed batch", "ours": round(speed, 1),
                     "reference": round(bare_speed, 1), "ratio": round(speed / bare_speed, 2), "unit": "img/s"})
    return rows


def cpu_model():
    with open("/proc/cpuinfo") as f:
        return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                    platform.processor())


def _run(bench, *args):
    """Runs one benchmark; a failure prints one line and does not hide the other rows."""
    started = time.perf_counter()
    try:
        return bench(*args)
    except Exception as error:
        print(f"{bench.__name__} failed: {' '.join(str(error).split())[:300]}")
    finally:
        print(f"{bench.__name__}: {time.perf_counter() - started:.0f} s", flush=True)


def main():
    cpu = tf.config.list_physical_devices("CPU")[0]  # Logical CPUs: the cost of towers and replicas.
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 4)
    rows = []
    _run(bench_lrn, rows)
    training_speed = _run(bench_training, rows)
    _run(bench_input_pipeline, rows, training_speed)
    _run(bench_loop, rows)
    _run(bench_export, rows)
    print(f"\n{cpu_model()}, {len(os.sched_getaffinity(0))} cores; TensorFlow {tf.__version__}, "
          f"Keras {keras.__version__}; {datetime.date.today().isoformat()}\n")
    print("| what | ours | reference | ratio | unit |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['what']} | {row['ours']} | {row['reference']} | {row['ratio']} | {row['unit']} |")


if __name__ == "__main__":
    main()

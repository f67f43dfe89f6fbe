"""Benchmarks behind `make bench`: each appends rows {what, ours, reference, ratio, unit}."""
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from keras_alexnet import data, export
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
    ours(), reference()  # Warm-up: tracing, kernel caches.
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
    import os  # Kept local: the rest of this module does not need it.

    folder = SHARED_DATA / "imagenette2_224_subset" / "train"
    if not folder.is_dir():
        print(f"skipped the input pipeline rows: {folder} not found")
        return rows
    count, batch_size = 1000, 50
    full = data.load_source(str(folder), "train", val_fraction=0.0)
    source = data.Source(full.images.take(count), full.class_names, count, full.skipped)
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

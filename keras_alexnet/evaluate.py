"""Top-1 / top-5 error of a model on a split, with the centre crop or the paper's 10-crop test (section 4.1).

    python -m keras_alexnet.evaluate --model_dir runs/alexnet [--ten_crop] [--split validation]

Another --dataset is labelled by the run's labels.txt, by class name: it may have fewer classes, not
others. The results go to MODEL_DIR/eval_<dataset>_<split>.json (or --output) and name both.
"""
import json
import math
import os
import re

import keras
import tensorflow as tf
from absl import app, flags

from keras_alexnet import checkpoint, cli, data


def make_eval_step(strategy, model):
    """A tf.function summing loss and top-1/top-5 hits over the replicas.

    Views of a 10-crop batch ([B, 10, 227, 227, 3]) are run as one batch and their softmax outputs
    averaged, as the paper did.
    """

    def replica_step(images, labels):
        if images.shape.rank == 5:
            views = tf.shape(images)[1]
            flat = tf.reshape(images, tf.concat([[-1], tf.shape(images)[2:]], 0))
            probabilities = model(flat, training=False)
            probabilities = tf.reduce_mean(tf.reshape(probabilities, [-1, views, probabilities.shape[-1]]), 1)
        else:
            probabilities = model(images, training=False)
        losses = keras.losses.sparse_categorical_crossentropy(labels, probabilities)
        return {"loss": tf.reduce_sum(losses), "top1": hits(labels, probabilities, 1),
                "top5": hits(labels, probabilities, 5), "images": tf.size(labels, tf.float32)}

    @tf.function
    def step(images, labels):
        totals = strategy.run(replica_step, (images, labels))
        return {k: strategy.reduce("SUM", v, axis=None) for k, v in totals.items()}

    return step


def hits(labels, probabilities, k):
    k = min(k, probabilities.shape[-1])
    return tf.reduce_sum(tf.cast(tf.math.in_top_k(tf.cast(labels, tf.int32), probabilities, k), tf.float32))


def evaluate(step, dataset, progress=True, batches=None):
    """{"loss", "top1_error", "top5_error", "images"} of a `make_eval_step` step over a finite dataset."""
    totals = {"loss": 0.0, "top1": 0.0, "top5": 0.0, "images": 0.0}
    bar = keras.utils.Progbar(batches, unit_name="batch", verbose=1 if progress else 0)
    for images, labels in dataset:
        for key, value in step(images, labels).items():
            totals[key] += float(value)
        bar.add(1)
    n = max(totals["images"], 1.0)
    return {"loss": totals["loss"] / n, "top1_error": 1 - totals["top1"] / n,
            "top5_error": 1 - totals["top5"] / n, "images": int(totals["images"])}


def report_name(dataset, split):
    """eval_<dataset>_<split>.json, of a folder's base name or a TFDS name; other characters become _."""
    name = os.path.basename(os.path.normpath(dataset)) if tf.io.gfile.isdir(dataset) else dataset
    return "eval_" + re.sub(r"[^\w.-]+", "_", f"{name}_{split}") + ".json"


FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("model_dir", None, "Training run to evaluate (its latest checkpoint).")
    flags.DEFINE_string("dataset", None, "Dataset to evaluate on; default: the run's own.")
    flags.DEFINE_string("data_dir", None, "TFDS data directory; default: the run's own.")
    flags.DEFINE_string("split", "validation", "Split to evaluate.")
    flags.DEFINE_integer("batch_size", 64, "Images per batch (10-crop runs 10 views per image).")
    flags.DEFINE_string("output", None, "JSON file for the results; default MODEL_DIR/eval_<dataset>_<split>.json.")
    flags.DEFINE_boolean("ten_crop", True, "Also report the paper's 10-crop test (section 4.1).")


@cli.reports_errors()
def main(argv):
    del argv
    model, run, step = checkpoint.restore_model(FLAGS.model_dir or "")
    dataset_name = FLAGS.dataset or run.config["dataset"]
    source = data.load_source(dataset_name, FLAGS.split, FLAGS.data_dir or run.config.get("data_dir"),
                              class_names=run.class_names)  # The run's labels, by name.
    stats = data.Stats.load(run.stats_path)
    strategy = tf.distribute.get_strategy()
    eval_step = make_eval_step(strategy, model)
    results = {}
    for name, ten_crop in [("centre crop", False)] + [("10-crop", True)] * FLAGS.ten_crop:
        dataset = data.eval_pipeline(source, FLAGS.batch_size, stats, ten_crop=ten_crop)
        batches = source.num_examples and math.ceil(source.num_examples / FLAGS.batch_size)
        results[name] = evaluate(eval_step, dataset, batches=batches)
    print(f"\n{FLAGS.split} of {dataset_name} at step {step}:")
    print("| test | top-1 error | top-5 error | loss | images |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['top1_error']:.2%} | {r['top5_error']:.2%} | {r['loss']:.4f} | {r['images']} |")
    output = FLAGS.output or os.path.join(FLAGS.model_dir, report_name(dataset_name, FLAGS.split))
    with tf.io.gfile.GFile(output + ".tmp", "w") as f:
        json.dump({"step": step, "dataset": dataset_name, "split": FLAGS.split, "results": results}, f, indent=2)
    tf.io.gfile.rename(output + ".tmp", output, overwrite=True)
    print(f"wrote {output}")


if __name__ == "__main__":
    define_flags()
    app.run(main)

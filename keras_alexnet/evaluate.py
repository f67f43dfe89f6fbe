"""Top-1 / top-5 error of a model on a split, with the centre crop and the paper's 10-crop test (section 4.1),
from one pass over the images (the centre crop is one of the ten views).

    python -m keras_alexnet.evaluate --model_dir runs/alexnet [--ten_crop] [--split validation]

Another --dataset is labelled by the run's labels.txt, by class name: it may have fewer classes, not
others. The results go to MODEL_DIR/eval_<dataset>_<split>.json (or --output) and name both.
"""
import json
import os
import re

import tensorflow as tf
from absl import app, flags

from keras_alexnet import cli, data, metrics, preprocess, sources, weights
from keras_alexnet.errors import UserError
from keras_alexnet.files import write_file


def report_name(dataset, split):
    """eval_<dataset>_<split>.json, of a folder's base name or a TFDS name; other characters become _."""
    name = os.path.basename(os.path.normpath(dataset)) if tf.io.gfile.isdir(dataset) else dataset
    return "eval_" + re.sub(r"[^\w.-]+", "_", f"{name}_{split}") + ".json"


FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("model_dir", None, "Training run to evaluate (its newest intact checkpoint, or --checkpoint).")
    flags.DEFINE_integer("checkpoint", None, "The step of the checkpoint to read; default: the newest intact one.")
    flags.DEFINE_string("dataset", None, "Dataset to evaluate on; default: the run's own.")
    flags.DEFINE_string("data_dir", None, "TFDS data directory; default: the run's own.")
    flags.DEFINE_string("split", "validation", "Split to evaluate.")
    flags.DEFINE_integer("batch_size", 64, "Images per batch (10-crop runs 10 views per image).")
    flags.DEFINE_string("output", None, "JSON file for the results; default MODEL_DIR/eval_<dataset>_<split>.json.")
    flags.DEFINE_boolean("ten_crop", True, "Also report the paper's 10-crop test (section 4.1).")


@cli.reports_errors
def main(argv):
    del argv
    model, run, step = weights.restore_model(FLAGS.model_dir or "", FLAGS.checkpoint)
    dataset_name = FLAGS.dataset or run.config.get("dataset")
    if not dataset_name:  # A converted model has no dataset of its own.
        raise UserError(f"{FLAGS.model_dir} names no dataset: give --dataset")
    source = sources.load_source(dataset_name, FLAGS.split, FLAGS.data_dir or run.config.get("data_dir"),
                              class_names=run.class_names)  # The run's labels, by name.
    stats = preprocess.Stats.load(run.stats_path)
    strategy = tf.distribute.get_strategy()
    eval_step = metrics.make_eval_step(strategy, model)
    # One pass: the 10-crop test's views hold the centre crop (metrics.make_eval_step).
    dataset = data.eval_pipeline(source, FLAGS.batch_size, stats, ten_crop=FLAGS.ten_crop)
    tests = ["centre crop", "10-crop"][:1 + FLAGS.ten_crop]
    results = dict(zip(tests, metrics.evaluate(eval_step, dataset, batches=data.eval_steps(
        source.num_examples, FLAGS.batch_size)), strict=True))
    print(f"\n{FLAGS.split} of {dataset_name} at step {step}:")
    print("| test | top-1 error | top-5 error | loss | images |\n|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['top1_error']:.2%} | {r['top5_error']:.2%} | {r['loss']:.4f} | {r['images']} |")
    output = FLAGS.output or os.path.join(FLAGS.model_dir, report_name(dataset_name, FLAGS.split))
    write_file(output, json.dumps({"step": step, "dataset": dataset_name, "split": FLAGS.split, "results": results},
                                  indent=2))
    print(f"wrote {output}")


if __name__ == "__main__":
    define_flags()
    app.run(main)

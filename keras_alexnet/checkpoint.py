"""What a training run keeps in its --model_dir, and how a model comes back from it.

    model_dir/
      config.json     the flags of the run and `model`: the build_alexnet arguments
      labels.txt      class names, one a line, in label order
      stats.npz       the data statistics the run subtracted (mean image, RGB eigen figures)
      checkpoints/    tf.train.CheckpointManager checkpoints: model, optimizer, step, loop state
"""
import collections
import json
import os

import tensorflow as tf

from keras_alexnet.model import build_alexnet

CONFIG, LABELS, STATS, CHECKPOINTS = "config.json", "labels.txt", "stats.npz", "checkpoints"

RunFiles = collections.namedtuple("RunFiles", ["config", "class_names", "stats_path"])


def write_labels(path, class_names):
    with tf.io.gfile.GFile(path, "w") as f:
        f.write("".join(f"{name}\n" for name in class_names))


def read_labels(path):
    with tf.io.gfile.GFile(path) as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def write_run_files(model_dir, config, class_names, stats):
    """Writes config.json, labels.txt and stats.npz beside the checkpoints."""
    tf.io.gfile.makedirs(model_dir)
    with tf.io.gfile.GFile(os.path.join(model_dir, CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    write_labels(os.path.join(model_dir, LABELS), class_names)
    stats.save(os.path.join(model_dir, STATS))


def read_run_files(model_dir):
    """The RunFiles of a run directory, or FileNotFoundError naming what is missing."""
    for name in (CONFIG, LABELS):
        if not tf.io.gfile.exists(os.path.join(model_dir, name)):
            raise FileNotFoundError(f"{model_dir} is not a training run: it has no {name}")
    with tf.io.gfile.GFile(os.path.join(model_dir, CONFIG)) as f:
        config = json.load(f)
    return RunFiles(config, read_labels(os.path.join(model_dir, LABELS)),
                    os.path.join(model_dir, STATS))


def restore_model(model_dir, checkpoint_path=None):
    """(model, run_files, step): the run's model with the weights of its latest (or a given) checkpoint."""
    run = read_run_files(model_dir)
    path = checkpoint_path or tf.train.latest_checkpoint(os.path.join(model_dir, CHECKPOINTS))
    if path is None:
        raise FileNotFoundError(f"{model_dir} has no checkpoint under {CHECKPOINTS}/")
    model = build_alexnet(**run.config["model"])
    step = tf.Variable(0, dtype=tf.int64)
    tf.train.Checkpoint(model=model, step=step).restore(path).expect_partial().assert_existing_objects_matched()
    return model, run, int(step.numpy())

"""What a training run keeps in its --model_dir, and how a model comes back from it.

    model_dir/
      config.json     the flags of the run and `model`: the build_alexnet arguments
      labels.txt      class names, one a line, in label order
      stats.npz       the data statistics the run subtracted (mean image, RGB eigen figures)
      checkpoints/    tf.train.CheckpointManager checkpoints: model, optimizer, step, loop state
      history.jsonl   one JSON line per epoch: train and validation metrics, images/s

A run directory knows what it is: a resumed run must compute what it was created to compute (data,
classes, batch, seed, update rule, augmentation, network: `check_resume`); the flags a resume may
change (epochs, learning rate, ...) are recorded in config.json with the step they took effect at.
labels.txt and stats.npz are written once, when the run is created.
"""
import collections
import hashlib
import json
import os
import re

import keras
import numpy as np
import tensorflow as tf

from keras_alexnet.model import build_alexnet

CONFIG, LABELS, STATS, CHECKPOINTS = "config.json", "labels.txt", "stats.npz", "checkpoints"
HISTORY = "history.jsonl"

RunFiles = collections.namedtuple("RunFiles", ["config", "class_names", "stats_path"])


def write_labels(path, class_names):
    with tf.io.gfile.GFile(path, "w") as f:
        f.write("".join(f"{name}\n" for name in class_names))


def read_labels(path):
    with tf.io.gfile.GFile(path) as f:
        return [line.rstrip("\n") for line in f if line.strip()]


# Flags a resume may change: they take effect from the step it resumes at, and config.json records
# each change in "changes". Every other value of config.json is what the run computes (its data, seed,
# update rule, augmentation, network): a resume with another one is refused (README, "Resuming").
RESUMABLE = ("model_dir", "epochs", "learning_rate", "checkpoint_every", "steps_per_loop", "eval_steps",
             "lr_patience", "max_lr_drops", "stuck_steps", "export_dir", "cache", "data_dir", "cpu_devices",
             "towers_per_replica", "jit_compile", "deterministic")
NAMES = {"steps_per_epoch": "steps per epoch", "input_shape": "input size", "model": "network"}


def check_resume(model_dir, config, class_names):
    """The changes [(key, run's value, new value)] of RESUMABLE flags that `config` (as written by the
    trainer) makes to the run in `model_dir`; a ValueError naming both values where it changes
    anything else, or the class names. [] for a new run."""
    if not tf.io.gfile.exists(os.path.join(model_dir, CONFIG)):
        return []
    run = read_run_files(model_dir)
    changes = []
    for key in [key for key in config if key != "model"] + ["classes", "model"]:  # The network by its classes.
        if key == "classes" and run.class_names != list(class_names):
            differ = sorted(set(run.class_names) ^ set(class_names)) or ["the same names in another order"]
            raise ValueError(f"{model_dir} was trained on other classes than this dataset's "
                             f"({', '.join(differ)}): use a new --model_dir")
        if key not in run.config or run.config[key] == config[key]:
            continue
        if key not in RESUMABLE:
            raise ValueError(f"{model_dir} was trained with {NAMES.get(key, '--' + key)} {run.config[key]}, not "
                             f"{config[key]}: resume with the same value, or use a new --model_dir")
        changes.append((key, run.config[key], config[key]))
    return changes


def record_changes(model_dir, changes, step):
    """Writes the new values of `changes` (check_resume's) into config.json, each also listed under
    "changes" with the step it took effect at."""
    run = read_run_files(model_dir).config
    run.update({key: new for key, _, new in changes})
    run["changes"] = run.get("changes", []) + [{"step": step, "flag": key, "was": old, "now": new}
                                                for key, old, new in changes]
    _write_atomically(os.path.join(model_dir, CONFIG), lambda path: _write_json(path, run))


def training_checkpoint(model, optimizer, **state):
    """The tf.train.Checkpoint of a training run: the one place that names its keys."""
    return tf.train.Checkpoint(model=model, optimizer=optimizer,
                               dropout_rng=[v.value for v in model.non_trainable_variables], **state)


def restore_training(ckpt, path):
    """Restores every value of a training checkpoint. One that lacks a value this version keeps (written
    by an older keras_alexnet) is refused in one line: resuming without it would not be exact."""
    try:
        ckpt.restore(path).assert_existing_objects_matched()
    except AssertionError as error:
        names = re.findall(r"tf\.Variable '([^':]+)", str(error))
        missing = sorted({re.sub(r"/replica_\d+$", "", name) for name in names}) or ["some values"]
        raise ValueError(f"{path} was written by another version of keras_alexnet: it lacks {', '.join(missing)}; "
                         "train in a new --model_dir, or start one from its weights with --init_from") from None


def write_run_files(model_dir, config, class_names, stats):
    """Writes config.json, labels.txt and stats.npz beside the checkpoints (each to a temporary name
    first, so a crash leaves no half-written file)."""
    tf.io.gfile.makedirs(model_dir)
    stats.save(os.path.join(model_dir, STATS))  # It writes a temporary file itself.
    _write_atomically(os.path.join(model_dir, LABELS), lambda path: write_labels(path, class_names))
    _write_atomically(os.path.join(model_dir, CONFIG), lambda path: _write_json(path, config))  # Marks a run.


def _write_atomically(path, write):
    """write(temporary path), then the rename to `path`: a crash leaves the old file or the new one."""
    temporary = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    write(temporary)
    tf.io.gfile.rename(temporary, path, overwrite=True)


def _write_json(path, value):
    with tf.io.gfile.GFile(path, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)


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


# What a fine-tuned model sets for itself; the other build_alexnet arguments describe the weights' network.
OWN_ARGUMENTS = ("num_classes", "dropout_rate", "init", "seed", "tower_devices", "name")


def architecture(run_dir):
    """The build_alexnet arguments of run_dir's network that weights depend on (the LRN's constants,
    towers, ...), for a model that starts from its weights; {} for no run_dir."""
    if not run_dir:
        return {}
    return {k: v for k, v in read_run_files(run_dir).config["model"].items() if k not in OWN_ARGUMENTS}


def load_matching_weights(model, run_dir):
    """Copies into `model` the weights of every layer of run_dir's latest checkpoint with the same name
    and weight shapes (fine-tuning: e.g. a converted bvlc_alexnet whose fc8 is re-initialised for
    another number of classes). Prints and returns (names loaded, "name (why)" skipped)."""
    source = restore_model(run_dir)[0]
    names = {layer.name for layer in source.layers}
    loaded, skipped = [], []
    for layer in model.layers:
        if not layer.weights:
            continue
        if layer.name not in names:
            skipped.append(f"{layer.name} (not in {run_dir})")
            continue
        theirs = source.get_layer(layer.name).weights
        shapes = [tuple(w.shape) for w in layer.weights], [tuple(w.shape) for w in theirs]
        if shapes[0] != shapes[1]:
            skipped.append(f"{layer.name} (shapes {shapes[0]} here, {shapes[1]} there)")
            continue
        for mine, source_weight in zip(layer.weights, theirs):
            mine.assign(source_weight.numpy())
        loaded.append(layer.name)
    print(f"--init_from {run_dir}: loaded {len(loaded)} layers; skipped {len(skipped)}: "
          f"{', '.join(skipped) or 'none'}")
    return loaded, skipped


def weights_digest(model):
    """sha256 of all weights: equal digests mean bit-identical models (resume and multi-worker tests)."""
    digest = hashlib.sha256()
    for variable in model.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(variable.value)).tobytes())
    return digest.hexdigest()[:16]

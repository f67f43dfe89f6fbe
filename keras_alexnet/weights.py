"""A model's weights: restored from a run directory, carried into another network (fine-tuning), digested."""
import hashlib
import os

import keras
import numpy as np
import tensorflow as tf

from keras_alexnet import checkpoint
from keras_alexnet.model import build_alexnet


def restore_model(model_dir, step=None):
    """(model, run_files, step): the run's model with the weights of its newest intact checkpoint (or of
    the one of `step`); a damaged newer one is named in a printed line (checkpoint.restore_intact)."""
    run = checkpoint.read_run_files(model_dir)
    model = build_alexnet(**run.config["model"])
    restored_step = tf.Variable(0, dtype=tf.int64)
    values = tf.train.Checkpoint(model=model, step=restored_step)
    path, damaged = checkpoint.restore_intact(
        os.path.join(model_dir, checkpoint.CHECKPOINTS),
        lambda path: values.restore(path).expect_partial().assert_existing_objects_matched(), step)
    if damaged:
        print(checkpoint.damage_report(damaged, path), flush=True)
    return model, run, int(restored_step.numpy())


# What a fine-tuned model sets for itself; the other build_alexnet arguments describe the weights' network.
OWN_ARGUMENTS = ("num_classes", "dropout_rate", "init", "seed", "tower_devices", "name")


def architecture(run_dir):
    """The build_alexnet arguments of run_dir's network that weights depend on (the LRN's constants,
    towers, ...), for a model that starts from its weights; {} for no run_dir."""
    if not run_dir:
        return {}
    return {k: v for k, v in checkpoint.read_run_files(run_dir).config["model"].items() if k not in OWN_ARGUMENTS}


def load_matching_weights(model, run_dir):
    """Copies into `model` the weights of every layer of run_dir's newest intact checkpoint with the same name
    and weight shapes (fine-tuning: e.g. a converted bvlc_alexnet whose fc8 is re-initialised for
    another number of classes). Returns (names loaded, "name (why)" skipped)."""
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
    return loaded, skipped


def weights_digest(model):
    """sha256 of all weights: equal digests mean bit-identical models (resume and multi-worker tests)."""
    digest = hashlib.sha256()
    for variable in model.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(variable.value)).tobytes())
    return digest.hexdigest()[:16]

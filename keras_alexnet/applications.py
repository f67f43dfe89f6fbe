"""AlexNet the keras.applications way: `AlexNet`, `preprocess_input`, `decode_predictions`.

    model = AlexNet(weights="runs/bvlc")                  # a run directory: its network and its weights
    probabilities = model.predict(preprocess_input(images, weights="runs/bvlc"))
    decode_predictions(probabilities, labels="runs/bvlc")  # [[(wnid, description, score), ...], ...]

As keras.applications.VGG16 and the others, but `weights` is None (section 5's initialisation), a run
directory (a training run, or a converted bvlc_alexnet) or a .keras file; nothing is downloaded. The
input is 227 x 227 x 3 whatever the head (model.py says why), so there is no `input_shape`.
"""
import inspect
import json
import os
import re

import keras
import numpy as np
import tensorflow as tf

from keras_alexnet import checkpoint, preprocess
from keras_alexnet.errors import UserError
from keras_alexnet.model import TOWERS, OnTower, build_alexnet
from keras_alexnet.weights import OWN_ARGUMENTS, restore_model

WNID = re.compile(r"(n\d{8}) (.+)")  # A synset_words.txt line: "n01440764 tench, Tinca tinca".


def AlexNet(weights=None, include_top=True, classes=None, classifier_activation="softmax", pooling=None,
            tower_devices=None, **options):
    """The network of Figure 2 as a keras.applications model.

    Args:
      weights: None (the paper's initialisation, section 5), a run directory (its network, e.g. a
        converted bvlc_alexnet's Caffe LRN constants, with its newest intact checkpoint) or a .keras file.
      include_top: the network to fc8; False: its convolutional base, pool5 of both towers, tower A's
        maps then B's (6 x 6 x 256 at width 1).
      classes: fc8's width; by default 1000, or with `weights` the loaded network's (another is refused).
      classifier_activation: "softmax" (the paper's, section 3.5) or None (fc8's logits).
      pooling: with include_top=False, None (pool5's maps), "avg" or "max" (global pooling, as Keras's).
      tower_devices, **options: build_alexnet's arguments (width, lrn_bias, dropout_rate, init, seed...).
        With a run directory, those of the network must equal its own; a .keras file takes none.
    """
    if classifier_activation not in ("softmax", None):
        raise UserError(f"classifier_activation must be 'softmax' (the paper's) or None (logits), "
                        f"got {classifier_activation!r}")
    if pooling not in (None, "avg", "max"):
        raise UserError(f"pooling must be None, 'avg' or 'max', got {pooling!r}")
    if pooling and include_top:
        raise UserError(f"pooling={pooling!r} pools the convolutional base: pass include_top=False too")
    net = _network(weights, classes, tower_devices, options)
    if include_top:
        units = _output(net, "fc8", weights).shape[-1]
        if classes not in (None, units):
            raise UserError(f"{weights} has {units} classes, not classes={classes}: pass classes={units}, or "
                            "include_top=False for its convolutional base")
        output = _output(net, "probabilities" if classifier_activation else "fc8", weights)
    else:
        names = [layer.name for layer in net.layers]  # A one-tower net's pool5, or that of a saved base.
        output = net.get_layer("pool5").output if "pool5" in names else keras.layers.Concatenate(name="pool5")(
            [_output(net, f"pool5{s}", weights) for s in TOWERS])
        if pooling:
            pool = keras.layers.GlobalAveragePooling2D if pooling == "avg" else keras.layers.GlobalMaxPooling2D
            output = pool(name=f"{pooling}_pool")(output)
    return net if output is net.output else keras.Model(net.input, output, name=net.name)


def _network(weights, classes, tower_devices, options):
    """The whole network of AlexNet's arguments (or what a .keras file holds), its weights loaded."""
    kind, path = _source(weights)
    if kind is None:
        classes = 1000 if classes is None else classes
        return build_alexnet(num_classes=classes, tower_devices=tower_devices, **options)
    if kind == "keras":
        if options:
            raise UserError(f"{path} holds its own network: drop {', '.join(options)}")
        net = keras.saving.load_model(path)
        if tower_devices is not None:
            for layer in net.layers:
                if isinstance(layer, OnTower):
                    layer.tower_devices = tower_devices
        return net
    source, run, _ = restore_model(path)
    defaults = {name: p.default for name, p in inspect.signature(build_alexnet).parameters.items()}
    theirs = {**defaults, **run.config["model"]}  # A run's config leaves out the defaults.
    clashes = [f"{key}={value!r} (its network's: {theirs[key]!r})" for key, value in options.items()
               if key in theirs and key not in OWN_ARGUMENTS and value != theirs[key]]
    if clashes:
        raise UserError(f"{path} has the weights of another network than {', '.join(clashes)}: drop them")
    net = build_alexnet(**{**run.config["model"], **options, "tower_devices": tower_devices})
    net.set_weights(source.get_weights())
    return net


def _source(weights):
    """("run" or "keras", path) of a run directory or a .keras file; (None, None) for weights=None."""
    if weights is None:
        return None, None
    path = os.fspath(weights)
    if tf.io.gfile.isdir(path):
        return "run", path
    if path.endswith(".keras") and tf.io.gfile.exists(path):
        return "keras", path
    raise UserError(f"weights={path!r} is no run directory or .keras file here: pass one, or None "
                    "(the paper's initialisation)")


def _output(net, name, weights):
    """The output of `net`'s layer `name`, or UserError for a .keras file saved without it."""
    if name not in [layer.name for layer in net.layers]:
        raise UserError(f"{weights} holds a network without {name} (a part of AlexNet was saved: see its "
                        "include_top and classifier_activation): ask for no more than it holds")
    return net.get_layer(name).output


def preprocess_input(images, weights=None):
    """What AlexNet takes for RGB 0-255 images [..., H, W, 3], one or a batch, of 227 x 227 or larger (256:
    the size of section 2's images): their centre 227 crop minus the mean image's centre patch.

    The mean image (section 2) is the run's own (its stats.npz) when `weights` is a run directory,
    ImageNet's (preprocess.Stats.imagenet) otherwise. float32: a numpy array of a numpy array, else a tensor.
    """
    kind, path = _source(weights)
    stats = (preprocess.Stats.load(checkpoint.read_run_files(path).stats_path) if kind == "run"
             else preprocess.Stats.imagenet())
    x = tf.cast(images, tf.float32)
    if x.shape.rank not in (3, 4) or x.shape[-1] != 3 or any(
            side is not None and side < preprocess.CROP_SIZE for side in x.shape[-3:-1]):
        raise UserError(f"preprocess_input takes RGB images [H, W, 3] or [N, H, W, 3] of at least "
                        f"{preprocess.CROP_SIZE} x {preprocess.CROP_SIZE}, got shape {tuple(x.shape)}")
    centred = preprocess.center_crop(x) - preprocess.center_crop(stats.mean_image)
    return centred.numpy() if isinstance(images, np.ndarray) else centred


def decode_predictions(probabilities, top=5, labels=None):
    """For each image of a batch [N, classes], its `top` classes as keras.applications gives them:
    (class id, description, score) tuples, best first.

    labels: class names, a run directory (its labels.txt), or None: ImageNet's 1000 classes from Keras's
    own imagenet_class_index.json where it is on this machine ($KERAS_HOME/models/, by default
    ~/.keras/models/; nothing is downloaded), as (wnid, Keras's name). A name "n01440764 tench, Tinca tinca"
    (synset_words.txt, as a converted bvlc_alexnet's labels) is ("n01440764", "tench, Tinca tinca"); any
    other name, e.g. a class folder's, is both id and description.
    """
    classes = _classes(labels)
    probabilities = keras.ops.convert_to_numpy(probabilities)
    if probabilities.ndim != 2 or probabilities.shape[1] != len(classes):
        raise UserError(f"decode_predictions takes a batch of predictions [N, {len(classes)}] (one score per "
                        f"class), got shape {probabilities.shape}")
    return [[(*classes[i], float(p[i])) for i in np.argsort(-p, kind="stable")[:top]] for p in probabilities]


def _classes(labels):
    """[(id, description)] of decode_predictions' `labels`."""
    if labels is None:
        home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
        path = os.path.join(home, "models", "imagenet_class_index.json")
        if not os.path.exists(path):
            raise UserError(f"ImageNet's class names are not on this machine (no {path}, and nothing is "
                            "downloaded): pass labels=, a list of class names or a run directory")
        with open(path) as f:
            index = json.load(f)
        return [tuple(index[str(i)]) for i in range(len(index))]
    if isinstance(labels, (str, os.PathLike)):
        labels = checkpoint.read_run_files(os.fspath(labels)).class_names
    return [match.groups() if (match := WNID.fullmatch(name)) else (name, name) for name in labels]

"""python -m keras_alexnet.convert: Caffe's bvlc_alexnet, as an ONNX file, into a two-tower run directory.

    python -m keras_alexnet.convert --onnx bvlcalexnet-12.onnx --model_dir runs/bvlc \\
        --labels synset_words.txt [--mean 104,117,123]

Caffe's reference model keeps the paper's layout: conv2, conv4 and conv5 are `group: 2` convolutions,
which split their input and output channels in halves, one per GPU (section 3.2). The halves become
the towers (first half `*_a`, second `*_b`), and the layers that see both GPUs are split by output:

    conv1, conv3  not grouped: output channels 0-47 (0-191) to tower A, the rest to B; conv3 reads
                  pool2 of A then B, Caffe's channel order and our concatenation's
    fc6, fc7      4096 outputs, 2048 a tower; fc6's 9216 inputs come from pool5 flattened C x H x W
                  in Caffe and H x W x C here, tower A's 6 x 6 x 128 then B's, so its rows are permuted
    fc8           one layer, on tower A

Caffe's LRN divides alpha by its local_size and adds k = 1 (the paper: alpha per term, k = 2), and
normalises conv1's 96 and conv2's 256 maps as one stack: the run's config builds the model with
lrn_bias = k, lrn_alpha = alpha / local_size and lrn_across_towers. Caffe's input is BGR with a
per-channel mean subtracted (104, 117, 123 for bvlc_alexnet, --mean to change it): conv1's input
channels are flipped so the model takes RGB like every run here, and stats.npz gets the mean in RGB.

Layers are found by the graph's structure (the order of its Conv, LRN, MaxPool and Gemm nodes, their
weight shapes, strides, pads and groups), not by node names; anything else fails with one line.
"""
import dataclasses
import os

import numpy as np
import tensorflow as tf
from absl import app, flags

from keras_alexnet import checkpoint, cli, preprocess
from keras_alexnet.errors import UserError
from keras_alexnet.files import atomic_write
from keras_alexnet.model import build_alexnet

CAFFE_MEAN_BGR = (104.0, 117.0, 123.0)  # bvlc_alexnet's ilsvrc_2012_mean.npy averaged per channel.
LAYOUT = ("Conv", "LRN", "MaxPool", "Conv", "LRN", "MaxPool", "Conv", "Conv", "Conv", "MaxPool",
          "Gemm", "Gemm", "Gemm")
PASSING = {"Relu", "Dropout", "Reshape", "Flatten", "Softmax", "Identity", "Constant"}
CONVS = {  # Caffe's weight shape (out, in / group, kh, kw), group, stride, pad.
    "conv1": ((96, 3, 11, 11), 1, 4, 0),
    "conv2": ((256, 48, 5, 5), 2, 1, 2),
    "conv3": ((384, 256, 3, 3), 1, 1, 1),
    "conv4": ((384, 192, 3, 3), 2, 1, 1),
    "conv5": ((256, 192, 3, 3), 2, 1, 1),
}
FCS = {"fc6": (4096, 9216), "fc7": (4096, 4096), "fc8": (None, 4096)}  # (out, in); fc8's out is the classes.


class ConversionError(UserError):
    """The ONNX file is not bvlc_alexnet's layout, or an argument is wrong."""


@dataclasses.dataclass
class Caffe:
    """bvlc_alexnet's weights in Caffe's layout: conv (out, in, kh, kw) and fc (out, in), with biases."""
    layers: dict  # name -> (weight, bias)
    lrn: dict     # ONNX LRN attributes: size, alpha, beta, bias


def read_onnx(path):
    """The Caffe weights of an ONNX file of bvlc_alexnet's layout, or ConversionError."""
    nodes, tensors = _layer_nodes(path)

    def weights(node, name):
        missing = [t for t in node.input[1:3] if t not in tensors]
        if len(node.input) < 3 or missing:
            raise ConversionError(f"{path}: {name} does not take constant weights and bias")
        return [tensors[t].astype(np.float32) for t in node.input[1:3]]

    layers = {}
    for name, (node, attrs) in zip(CONVS, [n for n in nodes if n[0].op_type == "Conv"]):
        shape, group, stride, pad = CONVS[name]
        kernel, bias = weights(node, name)
        got = (list(kernel.shape), attrs.get("group", 1), list(attrs.get("strides", [1, 1])),
               list(attrs.get("pads", [0] * 4)), list(attrs.get("dilations", [1, 1])))
        want = (list(shape), group, [stride] * 2, [pad] * 4, [1, 1])
        if got != want or bias.shape != shape[:1]:
            raise ConversionError(f"{path}: {name} has weights, group, strides, pads, dilations {got}; "
                                  f"bvlc_alexnet's are {want}")
        layers[name] = kernel, bias
    for name, (node, attrs) in zip(FCS, [n for n in nodes if n[0].op_type == "Gemm"]):
        out, inputs = FCS[name]
        weight, bias = weights(node, name)
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            raise ConversionError(f"{path}: {name} is a Gemm with transA, alpha or beta set")
        weight = weight if attrs.get("transB", 0) else weight.T  # To Caffe's (out, in).
        if weight.shape[1] != inputs or out not in (None, weight.shape[0]) or bias.shape != weight.shape[:1]:
            raise ConversionError(f"{path}: {name} has weights {list(weight.shape)} (out, in) and bias "
                                  f"{list(bias.shape)}; bvlc_alexnet's takes {inputs} inputs")
        layers[name] = weight, bias
    for node, attrs in nodes:
        # Caffe rounds pooled sizes up, which ONNX writes as a pad at the end; on a 227 input no window
        # reaches it (55 -> 27 -> 13 -> 6 either way).
        pads = list(attrs.get("pads", [0] * 4))
        if node.op_type == "MaxPool" and (list(attrs.get("kernel_shape", [])) != [3, 3] or pads[:2] != [0, 0]
                                          or list(attrs.get("strides", [1, 1])) != [2, 2] or max(pads) > 1):
            raise ConversionError(f"{path}: a MaxPool is not 3 x 3 at stride 2 (Caffe's overlapping pooling)")
    lrns = [{"size": a["size"], "alpha": a.get("alpha", 1e-4), "beta": a.get("beta", 0.75),
             "bias": a.get("bias", 1.0)} for n, a in nodes if n.op_type == "LRN"]
    if lrns[0] != lrns[1] or lrns[0]["size"] != 5 or abs(lrns[0]["beta"] - 0.75) > 1e-6:
        raise ConversionError(f"{path}: its LRNs {lrns} are not bvlc_alexnet's (size 5, beta 0.75, alike)")
    return Caffe(layers, lrns[0])


def _layer_nodes(path):
    """([(node, attributes)] of the LAYOUT nodes in graph order, {name: constant array}) of an ONNX file."""
    import onnx  # An extra: pip install 'keras_alexnet[onnx]'.
    from onnx import numpy_helper

    try:
        graph = onnx.load(path).graph
    except Exception as error:  # DecodeError, OSError, ... for a file that is not ONNX.
        raise ConversionError(f"{path} is not a readable ONNX file ({type(error).__name__})") from None
    tensors = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    tensors.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                    if n.op_type == "Constant" and n.attribute[0].name == "value"})
    kinds = [n.op_type for n in graph.node]
    unknown = sorted(set(kinds) - PASSING - set(LAYOUT))
    layout = [k for k in kinds if k in LAYOUT]
    if unknown or tuple(layout) != LAYOUT or kinds.count("Relu") != 7:
        found = f"{', '.join(unknown)} nodes" if unknown else f"layers {' '.join(layout)}, {kinds.count('Relu')} Relu"
        raise ConversionError(f"{path} is not bvlc_alexnet: it has {found}; expected {' '.join(LAYOUT)} "
                              "and 7 Relu")
    return ([(n, {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute})
             for n in graph.node if n.op_type in LAYOUT], tensors)


def tower_weights(caffe):
    """{layer name: [kernel, bias]} of build_alexnet's two towers, from Caffe's layout (module docstring)."""
    def conv(weight):  # (out, in, kh, kw) -> Keras's (kh, kw, in, out).
        return weight.transpose(2, 3, 1, 0)

    w1, b1 = caffe.layers["conv1"]
    w1 = w1[:, ::-1]  # Input channels BGR -> RGB.
    # Tower A's pool5 (6 x 6 x 128, flattened h, w, c) then B's: the Caffe input (c * 36 + h * 6 + w) of each.
    caffe_row = np.arange(9216).reshape(2, 128, 6, 6).transpose(0, 2, 3, 1).ravel()
    weights = {}
    for t, s in enumerate(("_a", "_b")):
        for name in ("conv1", "conv2", "conv3", "conv4", "conv5"):
            w, b = (w1, b1) if name == "conv1" else caffe.layers[name]
            weights[name + s] = [conv(np.split(w, 2)[t]), np.split(b, 2)[t]]
        w6, b6 = caffe.layers["fc6"]
        weights["fc6" + s] = [np.split(w6, 2)[t][:, caffe_row].T, np.split(b6, 2)[t]]
        w7, b7 = caffe.layers["fc7"]
        weights["fc7" + s] = [np.split(w7, 2)[t].T, np.split(b7, 2)[t]]
    w8, b8 = caffe.layers["fc8"]
    weights["fc8"] = [w8.T, b8]
    return {name: [np.ascontiguousarray(w, np.float32) for w in ws] for name, ws in weights.items()}


def model_kwargs(caffe):
    """build_alexnet's arguments for the converted model."""
    def decimal(value):  # ONNX stores float32: 1e-4 is 9.99999974738e-05, written back here as 0.0001.
        return float(str(np.float32(value)))

    return {"num_classes": int(caffe.layers["fc8"][0].shape[0]), "lrn_bias": decimal(caffe.lrn["bias"]),
            "lrn_alpha": decimal(caffe.lrn["alpha"]) / caffe.lrn["size"], "lrn_across_towers": True}


def mean_stats(mean_bgr):
    """preprocess.Stats with Caffe's per-channel mean (BGR) as an RGB mean image; ImageNet's eigen figures."""
    rgb = np.asarray(mean_bgr, np.float32)[::-1]
    return dataclasses.replace(preprocess.Stats.imagenet(), channel_mean=rgb,
                               mean_image=np.broadcast_to(rgb, (preprocess.IMAGE_SIZE, preprocess.IMAGE_SIZE, 3)))


def parse_mean(text):
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 3:
        raise ConversionError(f"--mean must be three numbers B,G,R (Caffe's order), got {text!r}")
    return values


def convert(onnx_path, model_dir, labels=None, mean_bgr=CAFFE_MEAN_BGR):
    """Writes the run directory (checkpoint at step 0, config.json, labels.txt, stats.npz); returns the model.

    A directory that holds anything but a converted run is refused; a converted run is replaced whole
    (files.atomic_write), holding its lock meanwhile.
    """
    if not os.path.isfile(onnx_path):
        raise ConversionError(f"no such ONNX file: {onnx_path}")
    lock = checkpoint.RunLock(model_dir)
    try:
        return _convert(onnx_path, model_dir, labels, mean_bgr)
    finally:
        lock.release()


def _convert(onnx_path, model_dir, labels, mean_bgr):
    if set(os.listdir(model_dir)) - {checkpoint.LOCK}:
        config = os.path.join(model_dir, checkpoint.CONFIG)
        if not os.path.isfile(config) or "converted_from" not in checkpoint.read_run_files(model_dir).config:
            raise ConversionError(f"{model_dir} holds files but no converted run (a training run?): convert into a "
                                  "new or empty --model_dir")
    caffe = read_onnx(onnx_path)
    kwargs = model_kwargs(caffe)
    if labels:
        class_names = checkpoint.read_labels(labels)
    else:
        class_names = [f"class {i}" for i in range(kwargs["num_classes"])]
    if len(class_names) != kwargs["num_classes"]:
        raise ConversionError(f"{labels} has {len(class_names)} labels for the model's {kwargs['num_classes']} "
                              "classes")
    model = build_alexnet(**kwargs)
    for name, weights in tower_weights(caffe).items():
        model.get_layer(name).set_weights(weights)
    config = {"model": kwargs, "dataset": None, "converted_from": os.path.abspath(onnx_path),
              "mean_bgr": list(mean_bgr)}
    with atomic_write(model_dir) as staging:
        checkpoint.write_run_files(staging, config, class_names, mean_stats(mean_bgr))
        ckpt = tf.train.Checkpoint(model=model, step=tf.Variable(0, dtype=tf.int64))
        tf.train.CheckpointManager(ckpt, os.path.join(staging, checkpoint.CHECKPOINTS), max_to_keep=1).save()
    return model


FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("onnx", None, "bvlc_alexnet as ONNX (the ONNX model zoo's bvlcalexnet-*.onnx).")
    flags.DEFINE_string("model_dir", None, "Run directory to write.")
    flags.DEFINE_string("labels", None, "Class names, one a line in the model's class order "
                        "(synset_words.txt for ILSVRC-2012); default: 'class 0', 'class 1', ...")
    flags.DEFINE_string("mean", ",".join(f"{v:g}" for v in CAFFE_MEAN_BGR),
                        "Per-channel mean B,G,R that the ONNX model expects subtracted.")


@cli.reports_errors
def main(argv):
    if len(argv) > 1:
        raise ConversionError(f"unexpected arguments {' '.join(argv[1:])}")
    if not FLAGS.onnx or not FLAGS.model_dir:
        raise ConversionError("--onnx and --model_dir are required")
    mean = parse_mean(FLAGS.mean)
    try:
        model = convert(FLAGS.onnx, FLAGS.model_dir, FLAGS.labels, mean)
    except ImportError as error:
        raise ConversionError(f"{error.name} is not installed: pip install 'keras_alexnet[onnx]'") from None
    print(f"converted {FLAGS.onnx} ({model.output.shape[-1]} classes) into {FLAGS.model_dir}")


if __name__ == "__main__":
    define_flags()
    app.run(main)

"""LiteRT (TFLite) and ONNX files of a trained network, written beside its SavedModel (`export --formats`).

Each file takes `images`, float32 [N, 227, 227, 3], RGB 0-255: an image's shorter side rescaled to 256,
its central 256 x 256 kept (section 2) and the centre 227 crop of that (`pixels`, with the code evaluation
uses). It returns the softmax `probabilities` [N, C] and `fc7` [N, 4096] (section 6.1's feature). The
run's mean image (its centre patch) is subtracted inside. The bytes-in signatures stay SavedModel-only:
decoding needs TensorFlow's image ops, which neither runtime has. `input.json` says this for code that is
not ours, and `labels.txt` names the classes.

int8 (litert_int8, onnx_int8): post-training quantisation of the weights and activations, calibrated on
a run's training images drawn as evaluation draws them (the centre crop). Inputs and outputs stay float32.
"""
import importlib
import json
import os
import warnings

import keras
import numpy as np
import tensorflow as tf

from keras_alexnet import checkpoint, preprocess, quietly, sources
from keras_alexnet.errors import UserError
from keras_alexnet.files import write_file
from keras_alexnet.lrn import LocalResponseNormalization
from keras_alexnet.model import INPUT_SHAPE, towers_unplaced

FILES = {"litert": "model.tflite", "litert_int8": "model_int8.tflite", "onnx": "model.onnx",
         "onnx_int8": "model_int8.onnx"}
FORMATS = ("saved_model", *FILES)
CONTRACT = "input.json"
ONNX_OPSET = 17
IMAGES = tf.TensorSpec([None, *INPUT_SHAPE], tf.float32, name="images")


def check_formats(formats):
    """The formats besides the SavedModel, once the packages that write them import; a UserError for an
    unknown one, a list without saved_model (the version directory is replaced whole) or a missing package."""
    if not set(formats) <= set(FORMATS) or "saved_model" not in formats:
        raise UserError(f"--formats takes saved_model and any of {', '.join(FILES)}; "
                        f"got {', '.join(formats) or 'none'}")
    others = [name for name in FILES if name in formats]
    for package in ["tf2onnx", "onnx", "onnxruntime"] if any(name.startswith("onnx") for name in others) else []:
        _package(package)
    return others


def _package(name):
    """The module `name` of the portable extra, or a UserError saying how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise UserError(f"{name} is not installed (LiteRT and ONNX need it): pip install -e '.[portable]'") from None


def pixels(image_bytes):
    """Encoded image -> float32 [227, 227, 3] RGB 0-255, as evaluation crops it (the files' input)."""
    return tf.cast(preprocess.center_crop(preprocess.decode_and_resize(image_bytes)), tf.float32)


def _outputs(model):
    """The network as a Keras model with two outputs: (probabilities, fc7)."""
    return keras.Model(model.input, [model.output, model.get_layer("fc7").output])


def _centred(images, stats):  # The mean made in the graph, a constant (tf2onnx takes a captured one for an input).
    return images - preprocess.center_crop(tf.constant(stats.mean_image))


def pixels_function(model, stats):
    """A tf.function: images [N, 227, 227, 3] -> {"probabilities", "fc7"}, the mean's centre patch subtracted,
    as the attribute `run` of a tf.Module that tracks the weights (LiteRT's converter saves it)."""
    both = _outputs(model)
    module = tf.Module()
    module.model_weights = [w.value for w in model.weights]  # Each once (as export.serving_module).

    @tf.function(input_signature=[IMAGES])
    def run(images):
        probabilities, fc7 = both(_centred(images, stats), training=False)
        return {"probabilities": probabilities, "fc7": fc7}

    with towers_unplaced():  # No device pins.
        run.get_concrete_function()
    module.run = run
    return module


def calibration_images(dataset, data_dir, count):
    """float32 [count, 227, 227, 3]: the first `count` readable images of `dataset`'s training split (its
    fixed order: for a folder, shuffled by seed 0), centre-cropped as evaluation crops them."""
    source = sources.load_source(dataset, "train", data_dir)
    images, _ = sources.decoded_images(source)
    crops = np.stack([preprocess.center_crop(image).numpy() for image, _ in images.take(count)]).astype(np.float32)
    if len(crops) < count:
        raise UserError(f"--calibration_images={count}, but {dataset}'s training split has {len(crops)} readable "
                        "images")
    return crops


def lrn_parts(model, names):
    """Of `names` (a converted graph's ops or nodes), those of the model's LRN layers, which the int8 files
    keep float32: quantised one by one, its parts (a window-sum matmul, powers) lose most of its precision.
    None for a net without LRN (ablate's no_lrn)."""
    layers = [layer.name for layer in model.layers  # Each in its tower's wrapper (model.OnTower), or not.
              if isinstance(getattr(layer, "layer", layer), LocalResponseNormalization)]
    parts = [name for name in names if any(f"/{layer}_" in name for layer in layers)]
    if layers and not parts:
        raise RuntimeError(f"no op of the LRN layers {layers} in the converted graph: the converter names them "
                           "otherwise now")
    return parts


def litert(model, stats, calibration=None):
    """The LiteRT flatbuffer (bytes) of pixels_function(model, stats); int8 with `calibration` images
    [n, 227, 227, 3]: int8 weights and activations but in LRN (lrn_parts), by TensorFlow's selective
    quantisation (the QuantizationDebugger's denylisted_nodes: the names of LRN's ops in the traced graph
    are those of their tensors in the file). LRN's float32 ops run on XNNPACK, as in the float32 file."""
    module = pixels_function(model, stats)
    function = module.run.get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function], module)
    with quietly():  # Its C++ prints what it quantises.
        if calibration is None:
            return converter.convert()
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([image[None]] for image in calibration)
        options = tf.lite.experimental.QuantizationDebugOptions(
            denylisted_nodes=lrn_parts(model, [op.name for op in function.graph.get_operations()]))
        with warnings.catch_warnings():  # It runs tf.lite.Interpreter, which warns that it is deprecated.
            warnings.filterwarnings("ignore", r"\s*Warning: tf.lite.Interpreter is deprecated", UserWarning)
            debugger = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_options=options)
        return debugger.get_nondebug_quantized_model()


def onnx(model, stats, path):
    """Writes the ONNX file of what pixels_function computes to `path`, by tf2onnx.

    The weights are inputs of the function tf2onnx converts (Keras's stateless_call), and then the file's
    initializers: tf2onnx copies every constant of a graph at each of its stages (9-14 GB for this net's
    233 MB), but converts a graph without them in a second. onnxruntime's basic offline optimisation
    (constant folding, semantics-preserving and not hardware-specific) then folds their layout transposes.
    """
    numpy_helper, onnxruntime, tf2onnx = (_package(name) for name in ("onnx.numpy_helper", "onnxruntime", "tf2onnx"))
    both = _outputs(model)
    weights, fixed = both.trainable_variables, [v.value for v in both.non_trainable_variables]
    specs = [IMAGES] + [tf.TensorSpec(w.shape, w.dtype, name=f"weight{i}") for i, w in enumerate(weights)]

    @tf.function(input_signature=specs)
    def run(images, *values):
        (probabilities, fc7), _ = both.stateless_call(list(values), fixed, _centred(images, stats), training=False)
        return {"probabilities": probabilities, "fc7": fc7}

    with towers_unplaced():
        proto, _ = tf2onnx.convert.from_function(run, input_signature=specs, opset=ONNX_OPSET)
    inputs = {graph_input.name: graph_input for graph_input in proto.graph.input}
    for spec, weight in zip(specs[1:], weights):
        proto.graph.input.remove(inputs[spec.name])
        proto.graph.initializer.append(numpy_helper.from_array(weight.numpy(), spec.name))
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = path
    onnxruntime.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def onnx_int8(model, float_path, path, calibration):
    """onnxruntime's static quantisation of the ONNX file of `model` at `float_path` into `path` (QDQ, int8
    weights per channel, uint8 activations), calibrated on `calibration` images; LRN's nodes (lrn_parts)
    stay float32."""
    quantization = _package("onnxruntime.quantization")
    lrn_nodes = lrn_parts(model, [node.name for node in _package("onnx").load(float_path).graph.node])

    class Images(quantization.CalibrationDataReader):
        def __init__(self):
            self.images = iter(calibration)

        def get_next(self):
            image = next(self.images, None)
            return None if image is None else {"images": image[None]}

    with quietly():  # It logs a suggestion to its root logger.
        quantization.quantize_static(float_path, path, Images(), quant_format=quantization.QuantFormat.QDQ,
                                     per_channel=True, weight_type=quantization.QuantType.QInt8,
                                     activation_type=quantization.QuantType.QUInt8, nodes_to_exclude=lrn_nodes)


def write_formats(model, stats, class_names, directory, formats, calibration=None):
    """Writes each of `formats` (FILES' keys) into `directory`, with input.json and labels.txt; the int8
    ones need `calibration` images."""
    if calibration is None and any(name.endswith("int8") for name in formats):
        raise UserError(f"int8 formats ({', '.join(formats)}) need calibration images")
    if "litert" in formats:
        write_file(os.path.join(directory, FILES["litert"]), litert(model, stats))
    if "litert_int8" in formats:
        write_file(os.path.join(directory, FILES["litert_int8"]), litert(model, stats, calibration))
    if "onnx" in formats or "onnx_int8" in formats:
        float_path = os.path.join(directory, FILES["onnx"] if "onnx" in formats else ".float.onnx")
        onnx(model, stats, float_path)
        if "onnx_int8" in formats:
            onnx_int8(model, float_path, os.path.join(directory, FILES["onnx_int8"]), calibration)
        if "onnx" not in formats:
            os.remove(float_path)
    contract = {
        "input": {"name": "images", "dtype": "float32", "shape": [None, *INPUT_SHAPE], "layout": "NHWC, RGB, 0-255",
                  "preprocessing": "shorter side rescaled to 256 (bilinear, antialiased), central 256 x 256, "
                                   "then its centre 227 x 227 crop; the mean image is subtracted inside"},
        "outputs": {"probabilities": [None, len(class_names)], "fc7": [None, 4096]},
        "labels": checkpoint.LABELS, "files": {name: FILES[name] for name in formats},
    }
    write_file(os.path.join(directory, CONTRACT), json.dumps(contract, indent=1))
    checkpoint.write_labels(os.path.join(directory, checkpoint.LABELS), class_names)


def runtime(path):
    """A .tflite or .onnx file -> (images [N, 227, 227, 3] float32 -> {"probabilities", "fc7"} as numpy),
    run by LiteRT (XNNPACK) or onnxruntime on this process's cores; a UserError for a file that is neither."""
    threads = len(os.sched_getaffinity(0))
    if path.endswith(".tflite"):
        interpreter = _package("ai_edge_litert.interpreter").Interpreter
        try:
            with quietly():  # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." at the first call.
                runner = interpreter(model_path=path, num_threads=threads).get_signature_runner()
                runner(images=np.zeros([1, *INPUT_SHAPE], np.float32))
        except (ValueError, RuntimeError) as error:  # What LiteRT raises for a file that is no model of its.
            raise _not_a_model(path, error) from None
        return lambda images: runner(images=np.asarray(images, np.float32))
    if not path.endswith(".onnx"):
        raise UserError(f"--model must be a .tflite or .onnx file of export --formats, got {path}")
    onnxruntime, errors = _package("onnxruntime"), _package("onnxruntime.capi.onnxruntime_pybind11_state")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    try:
        session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except (errors.InvalidProtobuf, errors.InvalidGraph, errors.Fail) as error:
        raise _not_a_model(path, error) from None
    names = [output.name for output in session.get_outputs()]
    return lambda images: dict(zip(names, session.run(names, {"images": np.asarray(images, np.float32)})))


def _not_a_model(path, error):
    return UserError(f"{path} is not a model file of export --formats: {' '.join(str(error).split())[:200]}")

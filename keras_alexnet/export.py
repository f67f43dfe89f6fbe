"""python -m keras_alexnet.export: a trained run as a self-contained SavedModel for TensorFlow Serving.

    python -m keras_alexnet.export --model_dir=runs/demo --export_dir=export/alexnet [--version=N] [--ten_crop]
        [--formats=saved_model,litert,litert_int8,onnx,onnx_int8] [--calibration_images=256]

writes EXPORT_DIR/VERSION/ (TF Serving's layout; VERSION defaults to the checkpoint's training step)
with four signatures over a batch of N images:

    serving_default  images      float32 [N, 227, 227, 3], RGB 0-255  -> probabilities [N, C],
                                                                        top5_classes int32 [N, K],
                                                                        top5_labels string [N, K]
    features         images                                          -> fc7 float32 [N, 4096]
    predict_images   image_bytes string [N], encoded JPEG/PNG/GIF/BMP -> as serving_default
    features_images  image_bytes                                     -> as features

K = min(5, C). fc7 is the post-ReLU last hidden layer whose Euclidean distances section 6.1 of the
paper uses to find similar images. The graph subtracts the run's mean image (its centre 227 crop);
the bytes signatures also decode, resize and crop (preprocess.decode_and_resize, then the centre crop or,
exported with --ten_crop, the mean over preprocess.ten_crop's 10 views, section 4.1, each view minus its
own patch of the mean image as in evaluate). The class names (a constant, and assets/labels.txt) and
the mean image travel inside, so serving needs no keras_alexnet; assets.extra/ holds TF Serving's
warm-up requests (keras_alexnet.warmup).
(`python -m keras_alexnet.make_npy` turns image files into saved_model_cli inputs.)
--formats adds LiteRT and ONNX files of the same weights to the version directory (keras_alexnet.portable:
the centre crop's pixels in, probabilities and fc7 out); the int8 ones are calibrated on
--calibration_images of the run's training split (or of --calibration_dataset).
"""
import os
import tempfile

import tensorflow as tf
from absl import app, flags

from keras_alexnet import checkpoint, cli, portable, preprocess, warmup, weights
from keras_alexnet.errors import UserError
from keras_alexnet.files import atomic_write
from keras_alexnet.model import INPUT_SHAPE, feature_model, towers_unplaced

IMAGES_EXPECTED = "images must be float32 [N, 227, 227, 3], RGB 0-255; got shape"
BYTES_EXPECTED = "image_bytes must be a string vector [N] of encoded JPEG/PNG/GIF/BMP images; got shape"


def _checked(tensor, ok, expected, shape):
    """`tensor` with the static `shape` if `ok`, else an error that prints `expected` and its real shape.

    A wrong tensor never reaches the ops after this (Grappler ran them before a plain assertion):
    the failing branch returns an empty tensor of the right shape once its assertion has passed.
    """
    def fail():
        with tf.control_dependencies([tf.debugging.Assert(False, [expected, tf.shape(tensor)], summarize=8)]):
            return tf.zeros([0 if size is None else size for size in shape], tensor.dtype)

    return tf.ensure_shape(tf.cond(ok, lambda: tensor, fail), shape)


def _images(images):
    ok = tf.cond(tf.rank(images) == 4, lambda: tf.reduce_all(tf.shape(images)[1:] == INPUT_SHAPE),
                 lambda: False)
    return _checked(images, ok, IMAGES_EXPECTED, (None, *INPUT_SHAPE))


def _image_bytes(image_bytes):
    return _checked(image_bytes, tf.rank(image_bytes) == 1, BYTES_EXPECTED, (None,))


def serving_module(model, class_names, stats, ten_crop=False, max_megapixels=preprocess.MAX_MEGAPIXELS):
    """A tf.Module with the model's weights (each once), the mean image and the four signatures.

    The bytes signatures refuse images above `max_megapixels` (stored as the variable of that name)
    or under preprocess.MIN_SIDE pixels a side, by their header, before decoding them.

    It tracks the raw variables, not the Keras model: a SavedModel of the Keras objects stores the
    weights twice, or does not run under saved_model_cli (variables not found).
    """
    num_classes = model.output.shape[-1]
    if len(class_names) != num_classes:
        raise UserError(f"{len(class_names)} class names for a model of {num_classes} classes")
    if not max_megapixels > 0:
        raise UserError(f"--max_megapixels must be positive, got {max_megapixels}")
    features = feature_model(model)
    module = tf.Module()
    module.model_weights = [w.value for w in model.weights]
    module.mean_image = tf.Variable(stats.mean_image, trainable=False, name="mean_image")  # [256, 256, 3]
    module.ten_crop = tf.Variable(ten_crop, trainable=False, name="ten_crop")  # How predict_images crops.
    module.max_megapixels = tf.Variable(float(max_megapixels), trainable=False, name="max_megapixels")

    def predictions(probabilities):
        top = tf.math.top_k(probabilities, min(5, num_classes))
        return {"probabilities": probabilities, "top5_classes": top.indices,
                "top5_labels": tf.gather(tf.constant(class_names), top.indices)}

    def run(net, inputs):  # TensorFlow's CPU Conv2D fails on an empty batch, so that skips the net.
        return tf.cond(tf.shape(inputs)[0] > 0, lambda: net(inputs, training=False),
                       lambda: tf.zeros((0, net.output.shape[-1])))

    def run_on_images(net, images):
        return run(net, _images(images) - preprocess.center_crop(module.mean_image))

    def run_on_bytes(net, image_bytes):
        """The mean image is subtracted before cropping, so each view loses its own patch of it (as evaluate)."""
        decoded = tf.map_fn(lambda one: preprocess.decode_and_resize(one, module.max_megapixels),
                            _image_bytes(image_bytes), fn_output_signature=tf.TensorSpec((256, 256, 3), tf.uint8))
        centred = tf.cast(decoded, tf.float32) - module.mean_image
        if not ten_crop:
            return run(net, tf.ensure_shape(preprocess.center_crop(centred), (None, *INPUT_SHAPE)))
        views = tf.map_fn(preprocess.ten_crop, centred, fn_output_signature=tf.TensorSpec((10, *INPUT_SHAPE)))
        return preprocess.average_over_views(lambda flat: run(net, flat), views)

    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32, name="images")])
    def serving_default(images):
        return predictions(run_on_images(model, images))

    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32, name="images")])
    def features_of_images(images):
        return {"fc7": run_on_images(features, images)}

    @tf.function(input_signature=[tf.TensorSpec(None, tf.string, name="image_bytes")])
    def predict_images(image_bytes):
        return predictions(run_on_bytes(model, image_bytes))

    @tf.function(input_signature=[tf.TensorSpec(None, tf.string, name="image_bytes")])
    def features_images(image_bytes):
        return {"fc7": run_on_bytes(features, image_bytes)}

    # Concrete functions: tf.saved_model.save would trace a tf.function again and store it twice. Traced
    # with the towers unplaced: the SavedModel pins no device, its loader places it.
    with towers_unplaced():
        module.serving_default = serving_default.get_concrete_function()
        module.features = features_of_images.get_concrete_function()
        module.predict_images = predict_images.get_concrete_function()
        module.features_images = features_images.get_concrete_function()
    return module


SIGNATURES = ("serving_default", "features", "predict_images", "features_images")


def load_signature(saved_model, name, output):
    """(the loaded SavedModel, its signature `name`), or a UserError naming the signatures it has, or
    the outputs of a signature of that name without `output` (another model's)."""
    loaded = tf.saved_model.load(saved_model)
    if name not in loaded.signatures:
        raise UserError(f"{saved_model} has no {name!r} signature (found: {', '.join(loaded.signatures)})")
    outputs = loaded.signatures[name].structured_outputs
    if output not in outputs:
        raise UserError(f"{saved_model} has no output {output!r} in signature {name!r} (it has: "
                         f"{', '.join(outputs)}): not a keras_alexnet export")
    return loaded, loaded.signatures[name]


def export_saved_model(model, class_names, stats, export_dir, version, ten_crop=False,
                       max_megapixels=preprocess.MAX_MEGAPIXELS, formats=("saved_model",), calibration=None):
    """Writes the SavedModel to EXPORT_DIR/VERSION/ and returns that path; with `formats`, the LiteRT and
    ONNX files of portable.FILES there too (int8 ones calibrated on `calibration` images).

    It is written beside it first and renamed into place, so a server watching EXPORT_DIR never
    loads half a model; an existing VERSION is replaced.
    """
    version = int(version)
    if version < 0:
        raise UserError(f"the version must be a non-negative integer, got {version}")
    path = os.path.join(export_dir, str(version))
    others = portable.check_formats(formats)
    module = serving_module(model, class_names, stats, ten_crop, max_megapixels)
    with tempfile.TemporaryDirectory() as tmp, atomic_write(path) as staging:  # ".N.tmp": TF Serving ignores it.
        checkpoint.write_labels(os.path.join(tmp, checkpoint.LABELS), class_names)
        module.labels = tf.saved_model.Asset(os.path.join(tmp, checkpoint.LABELS))
        tf.saved_model.save(module, staging, signatures={name: getattr(module, name) for name in SIGNATURES})
        warmup.write_requests(staging, os.path.basename(os.path.normpath(export_dir)))
        if others:
            portable.write_formats(model, stats, class_names, staging, others, calibration)
    return path


FLAGS = flags.FLAGS


def define_flags():  # Not at import: train.py imports this module and has flags of the same names.
    flags.DEFINE_string("model_dir", None, "Training run to export (its newest intact checkpoint, or --checkpoint).")
    flags.DEFINE_integer("checkpoint", None, "The step of the checkpoint to read; default: the newest intact one.")
    flags.DEFINE_string("export_dir", None, "Write the SavedModel to EXPORT_DIR/VERSION/.")
    flags.DEFINE_integer("version", None, "Version directory; default: the checkpoint's training step.")
    flags.DEFINE_bool("ten_crop", False, "Bytes signatures average section 4.1's 10 views, not the centre crop.")
    flags.DEFINE_float("max_megapixels", preprocess.MAX_MEGAPIXELS, "Bytes signatures refuse larger images, by "
                       "their header, before decoding (a decoded pixel costs 3 bytes, more while resizing).")
    flags.DEFINE_list("formats", ["saved_model"], f"saved_model and any of {', '.join(portable.FILES)}: LiteRT "
                      "and ONNX files of the same weights beside the SavedModel (keras_alexnet.portable).")
    flags.DEFINE_integer("calibration_images", 256, "Images the int8 formats are calibrated on.")
    flags.DEFINE_string("calibration_dataset", None, "Their dataset (its training split, centre crops); default: "
                        "the run's --dataset.")


@cli.reports_errors
def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {' '.join(argv[1:])} (python -m keras_alexnet.make_npy turns "
                         "image files into saved_model_cli inputs)")
    if not FLAGS.model_dir or not FLAGS.export_dir:
        raise UserError("--model_dir and --export_dir are required")
    portable.check_formats(FLAGS.formats)
    if FLAGS.calibration_images < 1:
        raise UserError(f"--calibration_images must be positive, got {FLAGS.calibration_images}")
    model, run, step = weights.restore_model(FLAGS.model_dir, FLAGS.checkpoint)
    stats = preprocess.Stats.load(run.stats_path)
    version = step if FLAGS.version is None else FLAGS.version
    replaced = tf.io.gfile.exists(os.path.join(FLAGS.export_dir, str(version)))
    calibration = None
    if any(name.endswith("int8") for name in FLAGS.formats):
        dataset = FLAGS.calibration_dataset or run.config.get("dataset")
        if not dataset:
            raise UserError(f"{FLAGS.model_dir} names no dataset to calibrate int8 on: give --calibration_dataset")
        calibration = portable.calibration_images(dataset, run.config.get("data_dir"), FLAGS.calibration_images)
    path = export_saved_model(model, run.class_names, stats, FLAGS.export_dir, version, FLAGS.ten_crop,
                              FLAGS.max_megapixels, FLAGS.formats, calibration)
    print(f"exported step {step} of {FLAGS.model_dir} to {path}" + "".join(
        f", {os.path.join(path, portable.FILES[name])}" for name in FLAGS.formats if name in portable.FILES))
    if replaced:
        print(f"replaced version {version}")


if __name__ == "__main__":
    define_flags()
    app.run(main)

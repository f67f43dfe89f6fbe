"""TensorFlow Serving's warm-up requests, written into every export: assets.extra/tf_serving_warmup_requests.

TF Serving replays them when it loads a version, so that the first real request does not wait for
the graph's first run (https://www.tensorflow.org/tfx/serving/saved_model_warmup). The file is a
TFRecord of PredictionLog protos, each a `predict_images` request with one or two small images.
The protos are written in protobuf's wire format with the field numbers of tensorflow_serving/apis
(prediction_log.proto, predict.proto, model.proto), so exporting needs no tensorflow-serving-api;
the tests parse the file with that package's own classes.
"""
import os

import numpy as np
import tensorflow as tf

PATH = os.path.join("assets.extra", "tf_serving_warmup_requests")
SIGNATURE = "predict_images"


def _varint(value):
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number, payload):
    """A length-delimited field (wire type 2): a string, bytes or an embedded message."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def prediction_log(model_name, inputs, signature=SIGNATURE):
    """Serialized PredictionLog{predict_log: PredictLog{request: PredictRequest}} for `inputs` {name: array}."""
    model_spec = _field(1, model_name.encode()) + _field(3, signature.encode())  # name, signature_name
    tensors = b"".join(_field(2, _field(1, key.encode()) + _field(2, tf.make_tensor_proto(value).SerializeToString()))
                       for key, value in inputs.items())  # map<string, TensorProto> inputs = 2
    request = _field(1, model_spec) + tensors
    return _field(6, _field(1, request))  # PredictionLog.predict_log = 6, PredictLog.request = 1


def sample_images():
    """A 300 x 200 JPEG and a 256 x 256 PNG: both decoders and the resize run once."""
    y, x = np.mgrid[:200, :300]
    pattern = np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)
    return [tf.io.encode_jpeg(pattern).numpy(), tf.io.encode_png(pattern[:, :256].repeat(2, 0)[:256]).numpy()]


def write_requests(saved_model_dir, model_name):
    """Writes the warm-up file into a SavedModel directory: a batch of one image, then of two."""
    jpeg, png = sample_images()
    tf.io.gfile.makedirs(os.path.join(saved_model_dir, os.path.dirname(PATH)))
    with tf.io.TFRecordWriter(os.path.join(saved_model_dir, PATH)) as writer:
        for batch in ([jpeg], [jpeg, png]):
            writer.write(prediction_log(model_name, {"image_bytes": np.array(batch, object)}))

"""python -m keras_alexnet.make_npy: image files as saved_model_cli inputs for an export's signatures.

    python -m keras_alexnet.make_npy --out=x.npy IMAGE...           # --inputs images=x.npy
    python -m keras_alexnet.make_npy --out=x.npy --bytes IMAGE...   # --inputs image_bytes=x.npy

writes decoded centre crops, float32 [N, 227, 227, 3] (RGB 0-255, as evaluation crops them), or with
--bytes the encoded files, an object array [N].
"""
import io

import numpy as np
import tensorflow as tf
from absl import app, flags

from keras_alexnet import cli, preprocess
from keras_alexnet.errors import UserError
from keras_alexnet.files import write_file


def make_npy(paths, out, encoded=False):
    """Writes saved_model_cli's input for `paths`: centre crops [N, 227, 227, 3] or the encoded files."""
    if not paths:
        raise UserError("give image files as arguments")
    files, crops = [], []
    for path in paths:
        if not tf.io.gfile.exists(path):
            raise FileNotFoundError(f"no such image: {path}")
        with tf.io.gfile.GFile(path, "rb") as f:
            files.append(f.read())
        try:  # Also with --bytes: a file the signature cannot decode is better caught here.
            crops.append(preprocess.center_crop(preprocess.decode_and_resize(files[-1])))
        except tf.errors.InvalidArgumentError as error:
            raise preprocess.DataError(f"{path}: {cli.one_line(error)}") from None
    if encoded:
        array = np.empty(len(files), object)  # saved_model_cli np.loads with allow_pickle=True.
        array[:] = files
    else:
        array = np.asarray(tf.stack(crops), np.float32)
    buffer = io.BytesIO()
    np.save(buffer, array)
    write_file(out, buffer.getvalue())
    return array.shape


FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("out", None, "The .npy to write.")
    flags.DEFINE_bool("bytes", False, "Write the encoded files (for image_bytes), not pixels.")


@cli.reports_errors
def main(argv):
    if not FLAGS.out:
        raise UserError("--out=FILE.npy is required")
    shape = make_npy(argv[1:], FLAGS.out, FLAGS.bytes)
    print(f"wrote {FLAGS.out}: {'object' if FLAGS.bytes else 'float32'} {list(shape)}")


if __name__ == "__main__":
    define_flags()
    app.run(main)

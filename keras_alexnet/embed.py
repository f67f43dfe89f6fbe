"""python -m keras_alexnet.embed: fc7 embeddings of images for TensorBoard's projector (section 6.1).

Section 6.1 of the paper probes what the network learned through the 4096 activations of its last
hidden layer, fc7: images whose fc7 vectors lie close in Euclidean distance look alike to the
network (Figure 4). This streams a folder of images, or a split of any dataset training accepts,
through an exported SavedModel's `features` signature and writes a projector log dir:

    LOGDIR/
      checkpoint, embedding.ckpt-1.*   tf.train.Checkpoint of one variable: fc7 [N, 4096]
      metadata.tsv                     header "file<TAB>label", then row i of fc7
      fc7.npy                          the same fc7 [N, 4096] float32, for numpy / pandas
      sprite.png                       row-major thumbnails, ceil(sqrt(N)) a side, at most 8192 px
      projector_config.pbtxt
      export.json                      path and fingerprint of the SavedModel (neighbors checks it)

    python -m keras_alexnet.embed --saved_model export/alexnet/1 --images photos/ --logdir runs/embeddings
    tensorboard --logdir runs/embeddings     # PROJECTOR tab

Memory stays bounded however many images there are: each batch's fc7 rows and thumbnails are
appended to raw files and only the final checkpoint variable holds all N x 4096 floats.
"""
import hashlib
import json
import math
import os
import re

import numpy as np
import tensorflow as tf
from absl import app, flags
from PIL import Image
from tensorboard.plugins import projector
from tensorboard.plugins.projector import metadata as projector_metadata

from keras_alexnet import cli, export, figures, preprocess, progress, sources
from keras_alexnet.errors import UserError
from keras_alexnet.files import atomic_write

SIGNATURE = "features"
TENSOR_NAME = "fc7/.ATTRIBUTES/VARIABLE_VALUE"  # The checkpoint key of tf.train.Checkpoint(fc7=...).
METADATA, SPRITE, CHECKPOINT, FC7 = "metadata.tsv", "sprite.png", "embedding.ckpt", "fc7.npy"
EXPORT = "export.json"  # The path and fingerprint of the SavedModel that computed the rows.
THUMB, MAX_SPRITE = 64, 8192  # Thumbnail side and the projector's largest sprite side, in pixels.


def load_features(saved_model):
    """A function from uint8 crops [n, 227, 227, 3] to their fc7 rows, float32 numpy [n, 4096]."""
    signature = export.load_signature(saved_model, SIGNATURE, "fc7")[1]
    return lambda crops: signature(images=tf.cast(crops, tf.float32))["fc7"].numpy()


class Examples:
    """(name, label, uint8 [256, 256, 3]) of a folder or a dataset split, in a stable order.

    `max_images` counts images that decode; `skipped` counts those that failed, once iterated.
    """

    def __init__(self, images=None, dataset=None, split="validation", data_dir=None, max_images=None):
        if (images is None) == (dataset is None):
            raise UserError("give exactly one of --images and --dataset")
        if max_images is not None and max_images < 1:
            raise UserError(f"--max_images must be positive, got {max_images}")
        self.folder, self.max_images, self.skipped = images, max_images, 0
        if images is not None:
            self.files = sources.list_images(images)
            self.total = min(len(self.files), max_images or len(self.files))
        else:
            self.source, self.split = sources.load_source(dataset, split, data_dir), split
            self.total = min(filter(None, [self.source.num_examples, max_images]), default=None)

    def __iter__(self):
        if self.folder is not None:
            taken = 0
            for path, label in self.files:
                if taken == self.max_images:
                    return
                try:
                    image = preprocess.decode_and_resize(tf.io.read_file(os.path.join(self.folder, path)))
                except (tf.errors.OpError, preprocess.DataError):
                    self.skipped += 1
                    continue
                taken += 1
                yield path, label, image
        else:
            names = self.source.class_names
            images, skipped = sources.decoded_images(self.source)
            if self.max_images:
                images = images.take(self.max_images)
            for i, (image, label) in enumerate(images):
                yield f"{self.split}/{i:06d}", names[int(label)], image
            self.skipped = skipped()


def embedded_batches(features, examples, batch_size):
    """Yields (names, labels, fc7 float32 [n, 4096], thumbnails uint8 [n, THUMB, THUMB, 3]) per batch.

    The network sees each image's centre 227 x 227 crop, and so does its thumbnail.
    """
    batch = []
    for example in examples:
        batch.append(example)
        if len(batch) == batch_size:
            yield _embed(features, batch)
            batch = []
    if batch:
        yield _embed(features, batch)


def _embed(features, batch):
    names, labels, images = zip(*batch)
    crops = preprocess.center_crop(tf.stack(images))
    thumbs = np.stack([np.asarray(Image.fromarray(c).resize((THUMB, THUMB), Image.Resampling.LANCZOS))
                       for c in np.asarray(crops, np.uint8)])
    return list(names), list(labels), features(crops), thumbs


def tsv_field(text):
    return re.sub(r"[\t\r\n]", " ", str(text))


def write_sprite(path, thumbs):
    """Writes thumbs [N, THUMB, THUMB, 3] as a ceil(sqrt(N)) square grid; returns the tile side.

    Past 16,384 thumbnails (128 a side) the tiles shrink to keep the sprite within MAX_SPRITE pixels
    a side; the shrunk tiles together are no larger than the sprite itself."""
    columns = math.ceil(math.sqrt(len(thumbs)))
    side = min(THUMB, MAX_SPRITE // columns)
    if side != THUMB:
        thumbs = [np.asarray(Image.fromarray(t).resize((side, side), Image.Resampling.LANCZOS)) for t in thumbs]
    Image.fromarray(figures.grid(thumbs, columns, rows=columns, background=0)).save(path)
    return side


def write_projector(logdir, batches, total=None):
    """Writes the projector log dir of `embedded_batches` output; returns the number of rows."""
    os.makedirs(logdir, exist_ok=True)
    raw = {key: os.path.join(logdir, f".{key}.raw") for key in ("fc7", "thumbs")}
    rows, width = 0, None
    bar = progress.progress_bar(total, "image")
    try:
        with open(raw["fc7"], "wb") as vectors, open(raw["thumbs"], "wb") as thumbs, \
                open(os.path.join(logdir, METADATA), "w", encoding="utf-8") as metadata:
            metadata.write("file\tlabel\n")
            for names, labels, fc7, thumbnails in batches:
                vectors.write(np.ascontiguousarray(fc7, np.float32).tobytes())
                thumbs.write(np.ascontiguousarray(thumbnails, np.uint8).tobytes())
                metadata.writelines(f"{tsv_field(n)}\t{tsv_field(l)}\n" for n, l in zip(names, labels))
                rows, width = rows + len(names), fc7.shape[1]
                bar.add(len(names))
        if not rows:
            raise preprocess.DataError("no image could be embedded")
        fc7_rows = np.memmap(raw["fc7"], np.float32, "r", shape=(rows, width))
        np.save(os.path.join(logdir, FC7), fc7_rows)  # Row i is line i + 1 of metadata.tsv.
        tf.train.Checkpoint(fc7=tf.Variable(fc7_rows, name="fc7")).save(os.path.join(logdir, CHECKPOINT))
        side = write_sprite(os.path.join(logdir, SPRITE),
                            np.memmap(raw["thumbs"], np.uint8, "r", shape=(rows, THUMB, THUMB, 3)))
    finally:
        for path in raw.values():
            if os.path.exists(path):
                os.remove(path)
    config = projector.ProjectorConfig()
    embedding = config.embeddings.add(tensor_name=TENSOR_NAME, metadata_path=METADATA)
    embedding.sprite.image_path = SPRITE
    embedding.sprite.single_image_dim.extend([side, side])
    projector.visualize_embeddings(logdir, config)
    return rows


def fingerprint(saved_model):
    """sha256 of the SavedModel's fingerprint.pb (saved_model.pb where there is none): which export it is."""
    for name in ("fingerprint.pb", "saved_model.pb"):
        if tf.io.gfile.exists(os.path.join(saved_model, name)):
            with tf.io.gfile.GFile(os.path.join(saved_model, name), "rb") as f:
                return hashlib.sha256(f.read()).hexdigest()
    raise FileNotFoundError(f"{saved_model} is not a SavedModel: it has no saved_model.pb")


def embedded_with(logdir):
    """{"saved_model": path, "fingerprint": sha256} of the export that wrote an embed log dir."""
    path = os.path.join(logdir, EXPORT)
    if not os.path.isfile(path):
        raise UserError(f"{logdir} does not name the export that embedded it (no {EXPORT}): run embed again")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def run(saved_model, logdir, images=None, dataset=None, split="validation", data_dir=None,
        max_images=None, batch_size=64):
    """Embeds the images and writes the projector log dir; returns (rows written, images skipped).

    The log dir is written beside `logdir` and renamed over it when complete: a failure leaves an
    existing log dir as it was. A folder that is not an embed log dir is never replaced.
    """
    if not saved_model:
        raise UserError("--saved_model is required")
    if batch_size < 1:
        raise UserError(f"--batch_size must be positive, got {batch_size}")
    logdir = os.path.normpath(logdir)
    if os.path.exists(logdir) and os.listdir(logdir) and not os.path.isfile(
            os.path.join(logdir, projector_metadata.PROJECTOR_FILENAME)):
        raise UserError(f"--logdir {logdir} holds files but is no embed log dir: choose a new or empty folder")
    examples = Examples(images, dataset, split, data_dir, max_images)
    features = load_features(saved_model)
    with atomic_write(logdir) as staging:
        rows = write_projector(staging, embedded_batches(features, examples, batch_size), examples.total)
        with open(os.path.join(staging, EXPORT), "w", encoding="utf-8") as f:
            json.dump({"saved_model": os.path.abspath(saved_model), "fingerprint": fingerprint(saved_model)}, f)
    return rows, examples.skipped


FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("saved_model", None, "SavedModel from keras_alexnet.export, e.g. export/alexnet/1.")
    flags.DEFINE_string("images", None, "A folder of class folders (names become labels) or of images.")
    flags.DEFINE_string("dataset", None, "Instead of --images: any dataset training accepts.")
    flags.DEFINE_string("split", "validation", "Split of --dataset.")
    flags.DEFINE_string("data_dir", None, "TFDS data directory of --dataset.")
    flags.DEFINE_integer("max_images", None, "Embed only the first N images (sorted paths / dataset order).")
    flags.DEFINE_integer("batch_size", 64, "Images per call of the signature.")
    flags.DEFINE_string("logdir", "runs/embeddings", "Projector log dir to write (tensorboard --logdir).")


@cli.reports_errors
def main(argv):
    del argv
    rows, skipped = run(FLAGS.saved_model, FLAGS.logdir, FLAGS.images, FLAGS.dataset,
                        FLAGS.split, FLAGS.data_dir, FLAGS.max_images, FLAGS.batch_size)
    print(f"wrote {rows} fc7 embeddings to {FLAGS.logdir}; skipped {skipped} images that failed to decode")


if __name__ == "__main__":
    define_flags()
    app.run(main)

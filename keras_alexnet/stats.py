"""python -m keras_alexnet.stats: the data statistics of sections 2 and 4.1 for a training split.

Streams the split once and writes an .npz (see preprocess.Stats) with the mean image (0-255 units), the
per-channel mean, and the eigenvalues / eigenvectors (columns, descending) of the 3x3 covariance of
RGB pixel values scaled to 0-1. Sums are accumulated in float64 inside a tf.function.
"""
import numpy as np
import tensorflow as tf
from absl import app, flags

from keras_alexnet import cli, preprocess, progress, sources

FLAGS = flags.FLAGS
flags.DEFINE_string("dataset", None, "'synthetic', a folder of class folders, or a TFDS name.")
flags.DEFINE_string("data_dir", None, "TFDS data directory.")
flags.DEFINE_string("split", "train", "Split to measure (the paper uses the training set).")
flags.DEFINE_string("output", "stats.npz", "Where to write the statistics.")
flags.DEFINE_integer("max_images", None, "Use only the first N images of the split.")
flags.DEFINE_integer("batch_size", 32, "Images per accumulation step.")


def compute_stats(images, total=None, batch_size=32):
    """preprocess.Stats of a dataset of (uint8 [256, 256, 3] image, label); `total` sizes the progress bar."""
    sums = {"image": tf.Variable(tf.zeros([preprocess.IMAGE_SIZE, preprocess.IMAGE_SIZE, 3], tf.float64)),
            "pixel": tf.Variable(tf.zeros([3], tf.float64)),
            "outer": tf.Variable(tf.zeros([3, 3], tf.float64)),
            "count": tf.Variable(tf.constant(0, tf.int64))}

    @tf.function
    def accumulate(batch):
        batch = tf.cast(batch, tf.float64)
        pixels = tf.reshape(batch, [-1, 3]) / 255.0
        sums["image"].assign_add(tf.reduce_sum(batch, axis=0))
        sums["pixel"].assign_add(tf.reduce_sum(pixels, axis=0))
        sums["outer"].assign_add(tf.matmul(pixels, pixels, transpose_a=True))
        sums["count"].assign_add(tf.shape(batch, out_type=tf.int64)[0])

    bar = progress.progress_bar(total, "image")
    for batch, _ in images.batch(batch_size).prefetch(tf.data.AUTOTUNE):
        accumulate(batch)
        bar.add(int(batch.shape[0]))
    count = int(sums["count"].numpy())
    if not count:
        raise preprocess.DataError("no decodable images to compute statistics from")
    pixels = count * preprocess.IMAGE_SIZE * preprocess.IMAGE_SIZE
    mean = sums["pixel"].numpy() / pixels
    covariance = sums["outer"].numpy() / pixels - np.outer(mean, mean)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1]
    return preprocess.Stats(mean_image=sums["image"].numpy() / count, channel_mean=mean * 255.0,
                      eigenvalues=eigenvalues[order], eigenvectors=eigenvectors[:, order])


@cli.reports_errors()
def main(argv):
    del argv
    source = sources.load_source(FLAGS.dataset, FLAGS.split, FLAGS.data_dir)
    (images, skipped), total = sources.decoded_images(source), source.num_examples
    if FLAGS.max_images:
        images, total = images.take(FLAGS.max_images), min(total or FLAGS.max_images, FLAGS.max_images)
    stats = compute_stats(images, total, FLAGS.batch_size)
    stats.save(FLAGS.output)
    print(f"{skipped()} corrupt files skipped; wrote {FLAGS.output}: channel mean "
          f"{np.round(stats.channel_mean, 2).tolist()}, eigenvalues {np.round(stats.eigenvalues, 4).tolist()}")


if __name__ == "__main__":
    flags.mark_flag_as_required("dataset")
    app.run(main)

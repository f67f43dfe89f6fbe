"""python -m keras_alexnet.stats: the data statistics of sections 2 and 4.1 for a training split.

Streams the split once and writes an .npz (see preprocess.Stats) with the mean image (0-255 units), the
per-channel mean, and the eigenvalues / eigenvectors (columns, descending) of the 3x3 covariance of
RGB pixel values scaled to 0-1, from float64 sums (`batch_sums`) added batch by batch (`add_sums`; prepare
adds them shard by shard).
"""
import numpy as np
import tensorflow as tf
from absl import app, flags

from keras_alexnet import cli, preprocess, progress, sources



@tf.function(input_signature=[tf.TensorSpec([None, preprocess.IMAGE_SIZE, preprocess.IMAGE_SIZE, 3], tf.uint8)])
def batch_sums(batch):
    """What the statistics need of a batch of uint8 [N, 256, 256, 3] images, in float64: the sums of the
    images, of their pixels (0-1) and of the pixels' RGB outer products, and N (`add_sums` adds them up)."""
    batch = tf.cast(batch, tf.float64)
    pixels = tf.reshape(batch, [-1, 3]) / 255.0
    return {"image": tf.reduce_sum(batch, axis=0), "pixel": tf.reduce_sum(pixels, axis=0),
            "outer": tf.matmul(pixels, pixels, transpose_a=True), "count": tf.shape(batch, out_type=tf.int64)[0]}


def add_sums(sums, more):
    """`sums` ({} at first) plus the `batch_sums` of more images: batch by batch, or shard by shard (prepare)."""
    return {**sums, **{key: sums.get(key, 0) + value for key, value in more.items()}}


def stats_from_sums(sums):
    """preprocess.Stats of the images `sums` (add_sums's) covers: section 2's mean image, section 4.1's
    RGB eigen figures."""
    count = int(sums.get("count", 0))
    if not count:
        raise preprocess.DataError("no decodable images to compute statistics from")
    pixels = count * preprocess.IMAGE_SIZE * preprocess.IMAGE_SIZE
    mean = np.asarray(sums["pixel"]) / pixels
    covariance = np.asarray(sums["outer"]) / pixels - np.outer(mean, mean)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    order = np.argsort(eigenvalues)[::-1]
    return preprocess.Stats(mean_image=np.asarray(sums["image"]) / count, channel_mean=mean * 255.0,
                            eigenvalues=eigenvalues[order], eigenvectors=eigenvectors[:, order])


def compute_stats(images, total=None, batch_size=32):
    """preprocess.Stats of a dataset of (uint8 [256, 256, 3] image, label); `total` sizes the progress bar."""
    sums, bar = {}, progress.progress_bar(total, "image")
    for batch, _ in images.batch(batch_size).prefetch(tf.data.AUTOTUNE):
        sums = add_sums(sums, batch_sums(batch))
        bar.add(int(batch.shape[0]))
    return stats_from_sums(sums)


FLAGS = flags.FLAGS


def define_flags():
    flags.DEFINE_string("dataset", None, "'synthetic', a folder of class folders, or a TFDS name.", required=True)
    flags.DEFINE_string("data_dir", None, "TFDS data directory.")
    flags.DEFINE_string("split", "train", "Split to measure (the paper uses the training set).")
    flags.DEFINE_string("output", "stats.npz", "Where to write the statistics.")
    flags.DEFINE_integer("max_images", None, "Use only the first N images of the split.")
    flags.DEFINE_integer("batch_size", 32, "Images per accumulation step.", lower_bound=1)


@cli.reports_errors
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
    define_flags()
    app.run(main)

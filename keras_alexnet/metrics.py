"""The loss and the top-1 / top-5 error of section 6, shared by the training and evaluation steps.

Labels of -1 mark padding and images that failed to load: they add nothing to any sum.
"""
import keras
import tensorflow as tf

from keras_alexnet import preprocess
from keras_alexnet.progress import progress_bar

TOTALS = ("loss", "top1", "top5", "images")  # Sums over images; `errors` turns them into rates.


def label_rank(labels, probabilities):
    """How many other classes score at least as high as the label: a tie counts against the label,
    so outputs that are all equal rank every label last, not first. A row holding a NaN ranks its
    label below any k (a miss), not first (NaN compares False)."""
    label_score = tf.gather(probabilities, tf.maximum(labels, 0), batch_dims=1)
    rank = tf.reduce_sum(tf.cast(probabilities >= label_score[:, None], tf.int32), -1) - 1
    return tf.where(tf.reduce_any(tf.math.is_nan(probabilities), -1), tf.int32.max, rank)


def totals(labels, probabilities):
    """float32 [4]: the summed loss, top-1 hits, top-5 hits and image count of a batch (TOTALS)."""
    labels = tf.cast(labels, tf.int32)
    valid = labels >= 0
    probabilities = tf.cast(probabilities, tf.float32)
    losses = keras.losses.sparse_categorical_crossentropy(tf.maximum(labels, 0), probabilities)
    rank = label_rank(labels, probabilities)

    def count(condition):
        return tf.reduce_sum(tf.cast(condition & valid, tf.float32))

    return tf.stack([tf.reduce_sum(tf.where(valid, losses, 0.0)), count(rank < 1), count(rank < 5),
                     count(valid)])


def errors(summed):
    """{"loss", "top1_error", "top5_error", "images"} from summed `totals` (numpy or a list)."""
    loss, top1, top5, images = (float(x) for x in summed)
    n = max(images, 1.0)
    return {"loss": loss / n, "top1_error": 1 - top1 / n, "top5_error": 1 - top5 / n, "images": int(images)}


def make_eval_step(strategy, model):
    """A tf.function: the `totals` of each test of a distributed batch, summed over the replicas: [1, 4]
    for centre crops; [2, 4] for a 10-crop batch ([B, 10, 227, 227, 3], preprocess.ten_crop's views, the
    centre crop first): the centre crop, and the ten views' softmax outputs averaged (section 4.1), from
    one pass of the network.
    """

    def replica_step(images, labels):
        if images.shape.rank == 5:
            views = preprocess.over_views(lambda flat: model(flat, training=False), images)
            return tf.stack([totals(labels, views[:, 0]), totals(labels, tf.reduce_mean(views, axis=1))])
        return totals(labels, model(images, training=False))[None]

    @tf.function
    def step(images, labels):
        return strategy.reduce("SUM", strategy.run(replica_step, (images, labels)), axis=None)

    return step


def evaluate(step, dataset, progress=True, batches=None, after_batch=None):
    """The `errors` of each test of a `make_eval_step` step over a finite (distributed) dataset, a list:
    [centre crop], or [centre crop, 10-crop] for 10-crop batches. `after_batch()` is called after each
    batch (the trainer's check for SIGTERM)."""
    summed = tf.zeros([1, len(TOTALS)])
    bar = progress_bar(batches, "batch", verbose=progress)
    for images, labels in dataset:
        summed += step(images, labels)
        bar.add(1)
        if after_batch:
            after_batch()
    return [errors(test) for test in summed.numpy()]

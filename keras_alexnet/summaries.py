"""TensorBoard summaries that TensorFlow's own ops write too slowly or too big: weight histograms."""
import numpy as np
import tensorflow as tf
from tensorboard.plugins.histogram import metadata as histogram_metadata

HISTOGRAM_BINS = 30
_CHUNK = 1 << 20  # Values binned at a time: bounded memory for fc6's 37.7M weights.


def histogram(name, values, step, bins=HISTOGRAM_BINS):
    """A TensorBoard histogram of `values` computed exactly with numpy, chunk by chunk.

    tf.summary.histogram compares every value with every bucket at once: 4.5 GB for fc6's kernel.
    This holds one float32 copy of the values and a float64 chunk, binned in float64: in float32
    the buckets of a range as narrow as a bias after a few small steps (0.1 +- 1e-8) collapse.
    """
    values = np.asarray(values, np.float32).ravel()
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    high = high if high > low else low + 1.0
    counts = np.zeros(bins)
    for start in range(0, values.size, _CHUNK):
        counts += np.histogram(values[start:start + _CHUNK].astype(np.float64), bins, (low, high))[0]
    edges = np.linspace(low, high, bins + 1)
    buckets = np.stack([edges[:-1], edges[1:], counts], axis=1)
    return tf.summary.write(name, tf.constant(buckets, tf.float64), step=step,
                            metadata=histogram_metadata.create_summary_metadata(name, ""))

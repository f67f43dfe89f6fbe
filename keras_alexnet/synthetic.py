"""A built-in synthetic dataset: 10 classes of drawn shapes and textures, made with TF ops, no files.

It exists so that `make train` runs offline in a few minutes and its result means something: it is
NOT a substitute for ImageNet. Each image is 256x256 RGB: a background colour, one large figure in a
second colour whose class decides its shape or texture, then a brightness gradient and pixel noise.
Position, size, rotation (up to 15 degrees), stripe period and both colours are random, so neither
the mean colour nor a single location gives the class away; a small CNN separates the classes in a
few epochs. Every image is a pure function of (split, index), so the dataset is the same everywhere.
"""
import math

import tensorflow as tf

CLASS_NAMES = ("disc", "square", "triangle", "ring", "cross",
               "horizontal stripes", "vertical stripes", "diagonal stripes", "checkerboard", "dots")
SIZES = {"train": 2560, "validation": 512}
_SPLIT_SEEDS = {"train": 1, "validation": 2}
_SIZE = 256


def label(index):
    """The class of image `index`: the labels cycle through 0..9."""
    return tf.cast(index % len(CLASS_NAMES), tf.int32)


def image_function(split):
    """index -> uint8 [256, 256, 3]: the images of `split` (SIZES[split] of them)."""
    return lambda index: _image(_SPLIT_SEEDS[split], index)


def _image(split_seed, index):
    key = tf.stack([tf.constant(split_seed, tf.int64), index])
    uniform = tf.random.stateless_uniform([12], key)
    background, foreground = uniform[0:3], uniform[3:6]
    # Too little contrast: use the complementary colour instead.
    foreground = tf.where(tf.reduce_mean(tf.abs(foreground - background)) < 0.3, 1.0 - background, foreground)
    centre = _SIZE * (0.35 + 0.3 * uniform[6:8])
    radius = _SIZE * (0.22 + 0.12 * uniform[8])
    angle = (uniform[9] - 0.5) * (math.pi / 6)
    period = 14.0 + 12.0 * uniform[10]

    rows, cols = tf.meshgrid(tf.range(_SIZE, dtype=tf.float32), tf.range(_SIZE, dtype=tf.float32), indexing="ij")
    dy, dx = rows - centre[0], cols - centre[1]
    u = tf.cos(angle) * dx + tf.sin(angle) * dy  # Figure coordinates: rotated, centred.
    v = -tf.sin(angle) * dx + tf.cos(angle) * dy
    distance = tf.sqrt(u ** 2 + v ** 2)
    patch = tf.maximum(tf.abs(u), tf.abs(v)) < radius  # Where the texture classes are drawn.
    phase_u, phase_v = (u / period) % 1.0, (v / period) % 1.0
    masks = [
        lambda: distance < radius,
        lambda: tf.maximum(tf.abs(u), tf.abs(v)) < 0.8 * radius,
        lambda: (v < 0.6 * radius) & (tf.abs(u) < 0.6 * (v + radius)),
        lambda: (distance < radius) & (distance > 0.6 * radius),
        lambda: (tf.minimum(tf.abs(u), tf.abs(v)) < 0.25 * radius) & (tf.maximum(tf.abs(u), tf.abs(v)) < radius),
        lambda: patch & (phase_v < 0.5),
        lambda: patch & (phase_u < 0.5),
        lambda: patch & (((u + v) / (period * math.sqrt(2.0))) % 1.0 < 0.5),
        lambda: patch & ((phase_u < 0.5) != (phase_v < 0.5)),
        lambda: patch & ((phase_u - 0.5) ** 2 + (phase_v - 0.5) ** 2 < 0.09),
    ]
    mask = tf.cast(tf.switch_case(label(index), masks), tf.float32)[..., None]
    image = background * (1.0 - mask) + foreground * mask
    gradient = (uniform[11] - 0.5) * 0.4 * (rows / _SIZE - 0.5)[..., None]
    noise = 0.2 * (tf.random.stateless_uniform([_SIZE, _SIZE, 3], key + 1) - 0.5)  # Cheaper than normal.
    image = tf.clip_by_value(image + gradient + noise, 0.0, 1.0)
    return tf.cast(tf.round(image * 255.0), tf.uint8)

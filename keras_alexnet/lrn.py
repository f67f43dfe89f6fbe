"""Local response normalisation (section 3.3 of the paper) with a hand-written gradient.

    b_c = a_c / d_c^beta,   d_c = k + alpha * sum_{j=c-n/2}^{c+n/2} a_j^2

over n = 2 * depth_radius + 1 adjacent channels, clipped at the ends of the channel axis. The paper's
constants are k = 2, n = 5, alpha = 1e-4, beta = 0.75.

alpha convention: the paper and `tf.nn.local_response_normalization` multiply each squared term by alpha.
Caffe (`LRN` layer, bvlc_alexnet's alpha = 1e-4) and PyTorch (`nn.LocalResponseNorm`) divide alpha by n,
so their alpha = 1e-4 equals alpha = 2e-5 here. To reproduce Caffe, pass `alpha=1e-4 / 5`.

The gradient is the closed form, not autodiff through the forward pass:

    dL/da_i = g_i * d_i^-beta - 2 * alpha * beta * a_i * sum_{c in window(i)} g_c * b_c / d_c

(the window is symmetric, so "every c whose window holds i" is the window of i). Both window sums are
a matmul with a banded C x C matrix of ones, which is what CPUs and GPUs do fastest; d^-0.75 is
rsqrt(d) * rsqrt(sqrt(d)), cheaper and as accurate as pow. Half-precision inputs are computed in float32
(float64 ones in float64) and returned in their own dtype.
"""
import keras
import numpy as np
import tensorflow as tf


def _band(channels, depth_radius):
    """C x C matrix with ones where |i - j| <= depth_radius: x^2 @ band is the window sum."""
    index = np.arange(channels)
    return tf.constant(np.abs(index[:, None] - index[None, :]) <= depth_radius, tf.float32)


def _inverse_power(d, beta):
    """d^-beta, with the paper's beta = 0.75 (and 0.5) on rsqrt instead of pow."""
    if beta == 0.75:
        return tf.math.rsqrt(d) * tf.math.rsqrt(tf.sqrt(d))
    if beta == 0.5:
        return tf.math.rsqrt(d)
    return tf.pow(d, -beta)


def local_response_normalization(x, depth_radius=2, bias=2.0, alpha=1e-4, beta=0.75):
    """Functional LRN over the last axis of `x`; same arguments and result as the tf.nn op."""
    dtype = x.dtype
    x = tf.cast(x, tf.float64 if dtype == tf.float64 else tf.float32)
    band = tf.cast(_band(x.shape[-1], depth_radius), x.dtype)

    def window_sum(t):
        flat = tf.reshape(t, [-1, t.shape[-1]])
        return tf.reshape(tf.matmul(flat, band), tf.shape(t))

    @tf.custom_gradient
    def lrn(a):
        d = bias + alpha * window_sum(tf.square(a))
        scale = _inverse_power(d, beta)
        b = a * scale

        def grad(g):
            return g * scale - (2.0 * alpha * beta) * a * window_sum(g * b / d)

        return b, grad

    return tf.cast(lrn(x), dtype)


@keras.saving.register_keras_serializable(package="keras_alexnet")
class LocalResponseNormalization(keras.layers.Layer):
    """Keras layer for the paper's LRN (section 3.3) over the channel axis of NHWC tensors.

    Defaults are the paper's: n = 2 * depth_radius + 1 = 5, k = bias = 2, alpha = 1e-4 (per term), beta = 0.75.
    """

    def __init__(self, depth_radius=2, bias=2.0, alpha=1e-4, beta=0.75, **kwargs):
        super().__init__(**kwargs)
        self.depth_radius = int(depth_radius)
        self.bias = float(bias)
        self.alpha = float(alpha)
        self.beta = float(beta)

    def call(self, inputs):
        return local_response_normalization(
            inputs, self.depth_radius, self.bias, self.alpha, self.beta)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "depth_radius": self.depth_radius, "bias": self.bias,
                "alpha": self.alpha, "beta": self.beta}


@keras.saving.register_keras_serializable(package="keras_alexnet")
class TowerLocalResponseNormalization(LocalResponseNormalization):
    """LRN of one tower's maps whose window reaches into the other tower's, as in Caffe's bvlc_alexnet.

    The paper normalises within each GPU's maps. Caffe's norm1 and norm2 normalise all 96 (256) maps as
    one stack, so the depth_radius maps either side of the split between the towers see the other
    tower's. Called on [tower A maps, tower B maps], it returns tower `tower`'s half (0 = A, 1 = B) of
    that stack's LRN, reading only depth_radius maps of the other tower.
    """

    def __init__(self, tower, **kwargs):
        super().__init__(**kwargs)
        self.tower = int(tower)

    def call(self, inputs):
        a, b = inputs
        r = self.depth_radius
        if self.tower == 0:
            return super().call(tf.concat([a, b[..., :r]], -1))[..., :-r]
        return super().call(tf.concat([a[..., -r:], b], -1))[..., r:]

    def compute_output_shape(self, input_shape):
        return input_shape[self.tower]

    def get_config(self):
        return {**super().get_config(), "tower": self.tower}

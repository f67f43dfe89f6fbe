"""The custom-gradient LRN against tf.nn.local_response_normalization and numerical gradients."""
import keras
import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf

from keras_alexnet.lrn import (LocalResponseNormalization, TowerLocalResponseNormalization,
                               local_response_normalization)

CASES = [  # shape, depth_radius, bias, alpha, beta
    ((2, 55, 55, 96), 2, 2.0, 1e-4, 0.75),   # conv1, the paper's constants
    ((2, 27, 27, 256), 2, 2.0, 1e-4, 0.75),  # conv2
    ((3, 5, 5, 7), 1, 1.0, 1e-3, 0.5),
    ((3, 5, 5, 13), 3, 0.5, 1e-2, 0.6),
    ((2, 4, 4, 3), 5, 2.0, 1e-4, 0.75),      # window wider than the channels
]


def builtin(x, r, k, a, b):
    return tf.nn.local_response_normalization(x, r, k, a, b)


def relative_error(got, want):
    return float(tf.reduce_max(tf.abs(got - want)) / tf.reduce_max(tf.abs(want)))


@pytest.mark.parametrize("shape, r, k, a, b", CASES)
@pytest.mark.parametrize("signed", [False, True])
def test_forward_and_gradient_match_the_builtin(shape, r, k, a, b, signed):
    rng = np.random.default_rng(hash((shape, signed)) % 2**32)
    x = tf.constant(rng.uniform(-30 if signed else 0, 30, shape), tf.float32)
    upstream = tf.constant(rng.normal(size=shape), tf.float32)
    grads = []
    for function in (local_response_normalization, builtin):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = function(x, r, k, a, b)
        grads.append((y, tape.gradient(y, x, output_gradients=upstream)))
    (ours, our_grad), (want, want_grad) = grads
    assert relative_error(ours, want) < 1e-5
    assert relative_error(our_grad, want_grad) < 1e-5


@pytest.mark.parametrize("r, k, a, b", [(2, 2.0, 1e-4, 0.75), (1, 1.0, 0.05, 0.5), (3, 0.5, 0.02, 0.6)])
def test_gradient_matches_a_numerical_one_in_float64(r, k, a, b):
    x = tf.constant(np.random.default_rng(r).uniform(-3, 3, (2, 3, 3, 9)), tf.float64)
    analytic, numeric = tf.test.compute_gradient(lambda t: local_response_normalization(t, r, k, a, b), [x])
    np.testing.assert_allclose(analytic[0], numeric[0], rtol=1e-6, atol=1e-8)


def test_backward_is_the_closed_form_not_autodiff_of_the_forward():
    x = tf.random.uniform((2, 5, 5, 8))

    @tf.function
    def gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = local_response_normalization(x)
        return tape.gradient(y, x)

    ops = {op.type for op in gradient.get_concrete_function(x).graph.get_operations()}
    assert "IdentityN" in ops  # tf.custom_gradient's marker.
    assert not ops & {"RsqrtGrad", "SqrtGrad", "SquareGrad", "LRNGrad"}  # No autodiff of the forward ops.


def test_works_inside_xla():
    x = tf.random.uniform((2, 13, 13, 32), 0, 20)

    def forward_backward(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = local_response_normalization(x)
        return y, tape.gradient(y, x)

    compiled = tf.function(forward_backward, jit_compile=True)(x)
    for got, want in zip(compiled, forward_backward(x)):
        assert relative_error(got, want) < 1e-5


@pytest.mark.parametrize("dtype, tolerance", [(tf.float16, 2e-3), (tf.bfloat16, 1e-2)])
def test_half_precision_is_computed_in_float32(dtype, tolerance):
    x = tf.random.uniform((2, 9, 9, 16), 0, 30)
    half = tf.cast(x, dtype)
    upstream = tf.cast(tf.random.normal(x.shape), dtype)

    @tf.function
    def forward_backward(half, upstream):
        with tf.GradientTape() as tape:
            tape.watch(half)
            y = local_response_normalization(half)
        return y, tape.gradient(y, half, output_gradients=upstream)

    y, grad = forward_backward(half, upstream)
    assert y.dtype == dtype and grad.dtype == dtype
    want = builtin(tf.cast(half, tf.float32), 2, 2.0, 1e-4, 0.75)
    assert relative_error(tf.cast(y, tf.float32), want) < tolerance
    assert bool(tf.reduce_all(tf.math.is_finite(tf.cast(grad, tf.float32))))
    # Every op of the traced forward and backward pass computes in float32: the half type only
    # comes in and goes out through casts.
    ops = forward_backward.get_concrete_function(half, upstream).graph.get_operations()
    in_half = {op.type for op in ops if any(t.dtype == dtype for t in [*op.inputs, *op.outputs])}
    assert in_half <= {"Placeholder", "Cast", "Identity", "IdentityN"}, in_half
    assert {op.type for op in ops if op.type in ("MatMul", "Rsqrt", "Square")} == {"MatMul", "Rsqrt", "Square"}
    # Then each value is the float32 one rounded once: within half an ulp of the half type (and
    # float32's own noise between the traced and the eager computation).
    precision = float(ml_dtypes.finfo(dtype.as_numpy_dtype).eps) / 2 + 1e-6
    with tf.GradientTape() as tape:
        x32 = tf.cast(half, tf.float32)
        tape.watch(x32)
        y32 = local_response_normalization(x32)
    grad32 = tape.gradient(y32, x32, output_gradients=tf.cast(upstream, tf.float32))
    tiny = float(ml_dtypes.finfo(dtype.as_numpy_dtype).smallest_subnormal)
    for got, expected in [(y, y32), (grad, grad32)]:
        np.testing.assert_allclose(tf.cast(got, tf.float32).numpy(), expected.numpy(), rtol=precision, atol=tiny)


def test_layer_config_round_trip_and_keras_file(tmp_path):
    layer = LocalResponseNormalization(depth_radius=3, bias=1.0, alpha=2e-5, beta=0.5, name="lrn")
    clone = LocalResponseNormalization.from_config(layer.get_config())
    assert (clone.depth_radius, clone.bias, clone.alpha, clone.beta) == (3, 1.0, 2e-5, 0.5)
    model = keras.Sequential([keras.Input((6, 6, 10)), layer])
    model.save(tmp_path / "lrn.keras")
    loaded = keras.models.load_model(tmp_path / "lrn.keras")
    x = np.random.default_rng(0).uniform(0, 20, (2, 6, 6, 10)).astype("float32")
    np.testing.assert_allclose(loaded(x), builtin(x, 3, 1.0, 2e-5, 0.5), rtol=1e-5)


def test_tower_lrn_is_each_half_of_the_lrn_of_both_towers():
    """Caffe normalises the 96 conv1 maps as one stack: each tower's half of tf.nn's LRN of the stack."""
    rng = np.random.default_rng(7)
    a, b = (tf.constant(rng.uniform(0, 60, (2, 5, 5, 48)), tf.float32) for _ in range(2))
    want = builtin(tf.concat([a, b], -1), 2, 1.0, 2e-5, 0.75)
    for tower in (0, 1):
        layer = TowerLocalResponseNormalization(tower, bias=1.0, alpha=2e-5)
        assert relative_error(layer([a, b]), want[..., 48 * tower:48 * (tower + 1)]) < 1e-6
    own = LocalResponseNormalization(bias=1.0, alpha=2e-5)(a)  # Tower A alone differs at its last maps.
    assert relative_error(own[..., :46], want[..., :46]) < 1e-6 and relative_error(own, want[..., :48]) > 1e-3
    config = TowerLocalResponseNormalization(1, bias=1.0, alpha=2e-5).get_config()
    assert TowerLocalResponseNormalization.from_config(config).tower == 1

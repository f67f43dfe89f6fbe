"""The two-tower network of Figure 2: shapes, parameters, initialisation, connectivity and placement."""
import contextlib
import io
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_alexnet
from conftest import NARROW
from keras_alexnet import distribute
from keras_alexnet.model import build_alexnet, feature_model, tower_variables

SHAPES = {  # Per tower, the paper's layer sizes (section 3.5 and Figure 2).
    "conv1": (55, 55, 48), "lrn1": (55, 55, 48), "pool1": (27, 27, 48), "conv2": (27, 27, 128),
    "lrn2": (27, 27, 128), "pool2": (13, 13, 128), "conv3_in": (13, 13, 256), "conv3": (13, 13, 192),
    "conv4": (13, 13, 192), "conv5": (13, 13, 128), "pool5": (6, 6, 128), "fc6_in": (9216,),
    "fc6": (2048,), "fc7_in": (4096,), "fc7": (2048,),
}


@pytest.fixture(scope="module")
def alexnet():
    """The paper's net: its parameter count, shapes, connectivity and fc7 are the point here. Tests of
    initialisation, placement and knobs build narrow nets (conftest.NARROW)."""
    return build_alexnet(seed=0)


def inner(model, name):
    return model.get_layer(name).layer


def test_parameter_count_is_bvlc_alexnets(alexnet):
    assert alexnet.count_params() == 60_965_224
    assert sum(int(np.prod(v.shape)) for v in alexnet.trainable_variables) == 60_965_224


def test_every_layer_has_the_papers_shape(alexnet):
    assert alexnet.input.shape == (None, 227, 227, 3)
    for name, shape in SHAPES.items():
        for tower in ("_a", "_b"):
            assert alexnet.get_layer(name + tower).output.shape == (None, *shape), name + tower
    assert alexnet.get_layer("fc7").output.shape == (None, 4096)
    assert alexnet.get_layer("fc8").output.shape == (None, 1000)
    assert alexnet.output.shape == (None, 1000)


def test_towers_meet_only_at_conv3_fc6_fc7(alexnet):
    def sources(name):
        return [t._keras_history.operation.name for t in tf.nest.flatten(alexnet.get_layer(name).input)]

    for tower in ("_a", "_b"):
        assert sources("conv2" + tower) == ["pool1" + tower]
        assert sources("conv4" + tower) == ["conv3" + tower]
        assert sources("conv5" + tower) == ["conv4" + tower]
        assert sources("conv3_in" + tower) == ["pool2_a", "pool2_b"]
        assert sources("fc6_in" + tower) == ["flatten_a", "flatten_b"]
        assert sources("fc7_in" + tower) == ["dropout6_a", "dropout6_b"]
    assert sources("fc7") == ["fc7_a", "fc7_b"]
    assert sources("fc8") == ["dropout7"]


@pytest.mark.parametrize("init, weight_std, biases", [
    ("paper", {"conv1": 0.01, "fc6": 0.01, "fc7": 0.01, "fc8": 0.01},
     {"conv1": 0, "conv2": 1, "conv3": 0, "conv4": 1, "conv5": 1, "fc6": 1, "fc7": 1, "fc8": 0}),
    ("caffe", {"conv1": 0.01, "fc6": 0.005, "fc7": 0.005, "fc8": 0.01},
     {"conv1": 0, "conv2": 0.1, "conv3": 0, "conv4": 0.1, "conv5": 0.1, "fc6": 0.1, "fc7": 0.1, "fc8": 0}),
])
def test_initialisation(init, weight_std, biases):
    # A quarter of the width: conv1_b still has 4,356 weights, its std within 5% by 4.7 standard errors.
    model = build_alexnet(10, init=init, seed=1, width=1 / 4)
    for name, std in weight_std.items():
        layer = inner(model, name if name == "fc8" else name + "_b")
        kernel = layer.kernel.numpy()
        assert abs(kernel.mean()) < std / 10 and kernel.std() == pytest.approx(std, rel=0.05), name
    for name, value in biases.items():
        for suffix in ("",) if name == "fc8" else ("_a", "_b"):
            np.testing.assert_array_equal(inner(model, name + suffix).bias.numpy(), np.float32(value))


def test_glorot_init_and_unknown_init():
    model = build_alexnet(10, init="glorot", seed=1, **NARROW)
    kernel = inner(model, "fc6_a").kernel.numpy()
    fan_in, fan_out = kernel.shape  # 9216 and 2048 in the paper's net.
    limit = np.sqrt(6 / (fan_in + fan_out))
    assert kernel.max() <= limit and kernel.min() >= -limit and kernel.std() == pytest.approx(limit / np.sqrt(3), rel=0.02)
    assert not inner(model, "conv2_a").bias.numpy().any()
    with pytest.raises(ValueError, match="unknown init 'he'"):
        build_alexnet(10, init="he", **NARROW)


def test_seed_makes_weights_reproducible():
    a, b, c = (build_alexnet(10, seed=seed, **NARROW) for seed in (3, 3, 4))
    np.testing.assert_array_equal(inner(a, "conv1_a").kernel, inner(b, "conv1_a").kernel)
    assert not np.array_equal(inner(a, "conv1_a").kernel, inner(c, "conv1_a").kernel)
    assert not np.array_equal(inner(a, "conv1_a").kernel, inner(a, "conv1_b").kernel)


def test_fc7_feature_model_is_the_concatenated_post_relu_halves(alexnet):
    x = np.random.default_rng(0).normal(0, 50, (2, 227, 227, 3)).astype("float32")
    features = feature_model(alexnet)(x).numpy()
    halves = keras.Model(alexnet.input, [alexnet.get_layer("fc7_a").output, alexnet.get_layer("fc7_b").output])(x)
    assert features.shape == (2, 4096) and features.min() >= 0
    np.testing.assert_allclose(features, np.concatenate([h.numpy() for h in halves], 1), rtol=1e-6)


def op_devices(concrete_function):
    return {op.name: tf.DeviceSpec.from_string(op.device).device_index
            for op in concrete_function.graph.get_operations() if op.type in ("Conv2D", "MatMul")}


def test_towers_run_on_their_own_devices(logical_cpus):
    model = build_alexnet(10, tower_devices=(logical_cpus[0], logical_cpus[1]), seed=0, **NARROW)
    forward = tf.function(lambda x: model(x, training=True))
    devices = op_devices(forward.get_concrete_function(tf.TensorSpec([2, 227, 227, 3])))
    assert len(devices) == 19  # Per tower 5 convolutions, 2 LRN window sums, fc6, fc7; and fc8.
    for name, device in devices.items():
        tower = re.search(r"(conv\d|fc\d|lrn\d)_(a|b)", name)
        assert device == (1 if tower and tower.group(2) == "b" else 0), name  # fc8 sits on tower A's.


def test_a_plan_places_each_replicas_towers(logical_cpus):
    cpu0, cpu1, cpu2, cpu3 = logical_cpus
    strategy = distribute.mirrored_strategy([cpu0, cpu1])
    with tower_variables(), strategy.scope():
        model = build_alexnet(10, tower_devices={cpu0: [cpu0, cpu2], cpu1: [cpu1, cpu3]}, seed=0, **NARROW)

    @tf.function
    def forward(x):
        return strategy.run(lambda x: model(x, training=False), (x,))

    devices = op_devices(forward.get_concrete_function(tf.TensorSpec([2, 227, 227, 3])))
    expected = {(0, "a"): 0, (0, "b"): 2, (1, "a"): 1, (1, "b"): 3}
    for name, device in devices.items():
        tower = re.search(r"(conv\d|fc\d|lrn\d)_(a|b)", name)
        replica = 1 if name.startswith("replica_1/") else 0
        assert device == expected[replica, tower.group(2) if tower else "a"], name
    assert {d for d in devices.values()} == {0, 1, 2, 3}


def test_a_plan_in_a_strategy_without_tower_variables_is_refused(logical_cpus):
    """Else the strategy would put both towers' weights on the replica's device (tower_variables' docstring)."""
    cpu0, cpu1 = logical_cpus[:2]
    strategy = distribute.mirrored_strategy([cpu0])
    with strategy.scope(), pytest.raises(ValueError, match=r"inside keras_alexnet.model.tower_variables\(\)"):
        build_alexnet(10, tower_devices={cpu0: [cpu0, cpu1]}, **NARROW)
    with strategy.scope(), tower_variables(), pytest.raises(ValueError, match="before strategy.scope()"):
        build_alexnet(10, tower_devices={cpu0: [cpu0, cpu1]}, **NARROW)


def test_ablation_knobs():
    no_lrn = build_alexnet(10, lrn=False, **NARROW)
    assert not [layer for layer in no_lrn.layers if layer.name.startswith("lrn")]
    pool = build_alexnet(10, pool_size=2, pool_stride=2, **NARROW)
    assert inner(pool, "pool1_a").pool_size == (2, 2) and pool.get_layer("pool5_a").output.shape == (None, 6, 6, 8)
    one = build_alexnet(1000, towers=1)  # The paper's width: its parameter count is the point.
    conv = 11 * 11 * 3 * 96 + 96 + 5 * 5 * 96 * 256 + 256 + 3 * 3 * 256 * 384 + 384 \
        + 3 * 3 * 384 * 384 + 384 + 3 * 3 * 384 * 256 + 256  # No grouping in conv2, conv4, conv5.
    dense = 9216 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * 1000 + 1000
    assert one.count_params() == conv + dense
    no_dropout = build_alexnet(10, dropout_rate=0.0, seed=0, **NARROW)
    x = np.ones((1, 227, 227, 3), "float32")
    np.testing.assert_array_equal(no_dropout(x, training=True), no_dropout(x, training=True))


def test_keras_file_round_trip_keeps_outputs_and_placement(tmp_path, logical_cpus):
    model = build_alexnet(10, tower_devices=[logical_cpus[0], logical_cpus[1]], seed=2, **NARROW)
    model.save(tmp_path / "alexnet.keras")
    loaded = keras.models.load_model(tmp_path / "alexnet.keras")
    x = np.random.default_rng(1).normal(0, 50, (2, 227, 227, 3)).astype("float32")
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-5, atol=1e-7)
    assert loaded.get_layer("conv1_b").tower_devices == [logical_cpus[0], logical_cpus[1]]


def test_summary_prints_the_layer_table(alexnet):
    out = io.StringIO()
    assert keras_alexnet.build_alexnet is build_alexnet
    with contextlib.redirect_stdout(out):
        alexnet.summary(line_length=150)
    text = out.getvalue()
    for name in ("conv1_a", "lrn1_b", "conv3_in_a", "fc7", "fc8", "probabilities"):
        assert name in text
    assert "60,965,224" in text


def test_unplaced_towers_keep_each_replicas_device(logical_cpus):
    """tower_devices=None inside a MirroredStrategy: every op of replica 1 runs on replica 1's device
    (a tf.device(None) scope would clear the replica's and put both replicas on one device)."""
    strategy = distribute.mirrored_strategy(logical_cpus[:2])
    with strategy.scope():
        model = build_alexnet(10, tower_devices=None, seed=0, width=1 / 16)

    @tf.function
    def forward(x):
        return strategy.run(lambda x: model(x, training=False), (x,))

    devices = op_devices(forward.get_concrete_function(tf.TensorSpec([2, 227, 227, 3])))
    assert len(devices) == 2 * 19
    for name, device in devices.items():
        assert device == (1 if name.startswith("replica_1/") else 0), name


def test_width_scales_every_layer_but_the_classes():
    narrow = build_alexnet(10, width=1 / 16)
    shapes = {layer.name: tuple(layer.layer.kernel.shape) for layer in narrow.layers if hasattr(layer, "layer")
              and hasattr(layer.layer, "kernel")}
    assert shapes["conv1_a"] == (11, 11, 3, 3) and shapes["conv3_b"] == (3, 3, 16, 12)  # 48 / 16; 2 x 128 / 16.
    assert shapes["conv5_b"] == (3, 3, 12, 8) and shapes["fc6_a"] == (6 * 6 * 16, 128)
    assert shapes["fc7_b"] == (256, 128) and shapes["fc8"] == (256, 10)
    with pytest.raises(ValueError, match="width must be positive"):
        build_alexnet(10, width=0)

"""keras_alexnet.AlexNet, preprocess_input and decode_predictions (keras.applications' conventions), each
against a reference computed without them: the written model, numpy, Keras's own decode_predictions."""
import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src.applications import imagenet_utils

from conftest import NARROW, SHARED_DATA, run_cli, write_run
from keras_alexnet import AlexNet, decode_predictions, feature_model, preprocess, preprocess_input
from keras_alexnet.errors import UserError
from keras_alexnet.lrn import TowerLocalResponseNormalization
from keras_alexnet.model import build_alexnet
from keras_alexnet.weights import restore_model

CAFFE_LRN = {"lrn_bias": 1.0, "lrn_alpha": 2e-5, "lrn_across_towers": True}  # A converted bvlc_alexnet's.
CLASSES = [f"class {i}" for i in range(10)]


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).normal(0, 60, (2, 227, 227, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def caffe_run(tmp_path_factory):
    """(run directory, the model written into it): 10 classes, Caffe's LRN, a mean image that is not ImageNet's."""
    kwargs = {"num_classes": 10, **NARROW, **CAFFE_LRN}
    mean = np.random.default_rng(1).uniform(0, 255, (256, 256, 3))
    stats = preprocess.Stats(mean, mean.mean((0, 1)), [3.0, 2.0, 1.0], np.eye(3))
    model = build_alexnet(**kwargs, seed=0)
    return write_run(tmp_path_factory.mktemp("applications") / "run", model, kwargs, CLASSES, stats=stats), model


def test_a_runs_weights_and_network(caffe_run, images):
    run, written = caffe_run
    model = AlexNet(weights=run)
    np.testing.assert_array_equal(model(images), written(images))
    np.testing.assert_array_equal(model(images), restore_model(str(run))[0](images))
    lrn = model.get_layer("lrn1_a").layer  # Caffe's constants, and its windows across the towers.
    assert isinstance(lrn, TowerLocalResponseNormalization)
    assert (lrn.get_config()["bias"], lrn.get_config()["alpha"]) == (1.0, 2e-5)


def test_options_pass_through_and_may_not_contradict_the_run(caffe_run, logical_cpus):
    run, _ = caffe_run
    pair = logical_cpus[:2]
    model = AlexNet(weights=run, tower_devices=pair, dropout_rate=0.0, lrn_bias=1.0)  # The run's own lrn_bias.
    assert model.get_layer("conv1_b").tower_devices == pair
    assert model.get_layer("dropout7").layer.rate == 0.0
    assert AlexNet(tower_devices=pair, **NARROW).get_layer("fc6_b").tower_devices == pair
    with pytest.raises(UserError, match=r"lrn_bias=2\.0 \(its network's: 1\.0\)"):
        AlexNet(weights=run, lrn_bias=2.0)
    with pytest.raises(UserError, match=r"towers=1 \(its network's: 2\)"):  # Not in its config: the default.
        AlexNet(weights=run, towers=1)


def test_the_convolutional_base_and_its_global_pooling(images):
    full = build_alexnet(seed=0, **NARROW)
    towers = np.concatenate([feature_model(full, f"pool5{s}")(images) for s in ("_a", "_b")], axis=-1)
    maps = AlexNet(include_top=False, seed=0, **NARROW)(images).numpy()
    assert maps.shape == (2, 6, 6, 256 // 16)
    np.testing.assert_array_equal(maps, towers)  # Tower A's maps, then B's.
    for pooling, reduce in (("avg", np.mean), ("max", np.max)):
        pooled = AlexNet(include_top=False, pooling=pooling, seed=0, **NARROW)(images)
        np.testing.assert_allclose(pooled, reduce(maps, axis=(1, 2)), rtol=1e-6, atol=1e-6)


def test_logits_are_what_the_softmax_takes(caffe_run, images):
    logits = AlexNet(classifier_activation=None, seed=0, **NARROW)(images)
    assert logits.shape == (2, 1000)
    np.testing.assert_allclose(tf.nn.softmax(logits), AlexNet(seed=0, **NARROW)(images), rtol=1e-5, atol=1e-8)
    assert AlexNet(weights=caffe_run[0], classifier_activation=None).output.shape == (None, 10)


def test_mismatches_are_one_user_error(caffe_run, tmp_path):
    with pytest.raises(UserError, match=r"has 10 classes, not classes=1000: pass classes=10"):
        AlexNet(weights=caffe_run[0], classes=1000)
    with pytest.raises(UserError, match="no run directory or .keras file"):
        AlexNet(weights=tmp_path / "nowhere")
    with pytest.raises(UserError, match="no run directory or .keras file"):
        AlexNet(weights=tmp_path / "missing.keras")
    with pytest.raises(UserError, match="pass include_top=False"):
        AlexNet(pooling="avg")
    with pytest.raises(UserError, match="pooling must be"):
        AlexNet(include_top=False, pooling="mean")
    with pytest.raises(UserError, match="classifier_activation must be"):
        AlexNet(classifier_activation="sigmoid")


@pytest.mark.slow
def test_keras_files_round_trip(caffe_run, images, tmp_path, logical_cpus):
    """Both LRN layers, OnTower and ReplicaDropout load in a process that imported keras_alexnet only."""
    models = {"paper": AlexNet(seed=0, **NARROW), "caffe": AlexNet(weights=caffe_run[0])}
    np.save(tmp_path / "x.npy", images)
    for name, model in models.items():
        model.save(tmp_path / f"{name}.keras")
    script = ("import sys, keras, numpy as np, keras_alexnet\n"
              "x = np.load(sys.argv[1] + '/x.npy')\n"
              "np.savez(sys.argv[1] + '/y.npz', **{n: keras.saving.load_model(f'{sys.argv[1]}/{n}.keras')(x) "
              "for n in ('paper', 'caffe')})\n")
    result = run_cli("-c", script, str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = np.load(tmp_path / "y.npz")
    for name, model in models.items():
        expected = model(images)
        np.testing.assert_array_equal(loaded[name], expected)
        np.testing.assert_array_equal(AlexNet(weights=tmp_path / f"{name}.keras")(images), expected)
    assert AlexNet(weights=tmp_path / "paper.keras", tower_devices=logical_cpus[:2]).get_layer(
        "conv1_b").tower_devices == logical_cpus[:2]
    base = AlexNet(weights=tmp_path / "paper.keras", include_top=False)
    np.testing.assert_array_equal(base(images), AlexNet(include_top=False, seed=0, **NARROW)(images))
    with pytest.raises(UserError, match="holds its own network: drop width"):
        AlexNet(weights=tmp_path / "paper.keras", **NARROW)


def test_preprocess_input_subtracts_the_mean_images_centre_patch(caffe_run):
    run, _ = caffe_run
    photos = np.random.default_rng(2).integers(0, 256, (2, 256, 256, 3)).astype(np.uint8)
    crops = photos[:, 14:241, 14:241].astype(np.float32)  # (256 - 227) // 2 = 14.
    mean = np.load(run / "stats.npz")["mean_image"]
    expected = crops - mean[14:241, 14:241]
    centred = preprocess_input(photos, weights=run)
    assert isinstance(centred, np.ndarray) and centred.dtype == np.float32
    np.testing.assert_allclose(centred, expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(preprocess_input(crops[0], weights=run), expected[0], rtol=0, atol=1e-4)
    imagenet = preprocess_input(tf.constant(photos))  # A tensor in, a tensor out; ImageNet's channel means.
    assert isinstance(imagenet, tf.Tensor)
    np.testing.assert_allclose(imagenet, crops - np.float32([123.68, 116.78, 103.94]), rtol=0, atol=1e-4)
    with pytest.raises(UserError, match="at least 227 x 227"):
        preprocess_input(photos[:, :200, :200])


def test_decode_predictions_ranks_as_argsort(caffe_run):
    probabilities = tf.nn.softmax(np.random.default_rng(3).normal(size=(3, 10))).numpy()
    decoded = decode_predictions(probabilities, top=3, labels=caffe_run[0])
    assert decoded == [[(CLASSES[i], CLASSES[i], float(p[i])) for i in np.argsort(p)[::-1][:3]]
                       for p in probabilities]
    synsets = ["n01440764 tench, Tinca tinca", "n01443537 goldfish, Carassius auratus", "cat"]
    assert decode_predictions(np.float32([[0.2, 0.5, 0.3]]), top=3, labels=synsets) == [[
        ("n01443537", "goldfish, Carassius auratus", 0.5), ("cat", "cat", pytest.approx(0.3)),
        ("n01440764", "tench, Tinca tinca", pytest.approx(0.2))]]
    with pytest.raises(UserError, match=r"\[N, 10\]"):
        decode_predictions(probabilities[:, :5], labels=caffe_run[0])


def test_decode_predictions_of_imagenet_as_keras_gives_them(tmp_path, monkeypatch):
    index_file = SHARED_DATA / "imagenet_labels" / "imagenet_class_index.json"
    if not index_file.exists():
        pytest.skip(f"no {index_file}")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(UserError, match="pass labels="):  # Nothing is downloaded.
        decode_predictions(np.ones([1, 1000]))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "imagenet_class_index.json").write_text(index_file.read_text())
    monkeypatch.setattr(imagenet_utils, "CLASS_INDEX", json.loads(index_file.read_text()))  # Keras's, offline.
    probabilities = tf.nn.softmax(np.random.default_rng(4).normal(size=(2, 1000))).numpy()
    expected = [[(wnid, name, float(score)) for wnid, name, score in row]
                for row in keras.applications.imagenet_utils.decode_predictions(probabilities, top=5)]
    assert decode_predictions(probabilities) == expected

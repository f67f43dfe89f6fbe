"""keras_alexnet.convert: bvlc_alexnet's ONNX layout into two towers, checked against onnxruntime on real photos."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from conftest import SYNSET_WORDS, caffe_input, run_program, shared_data, write_bvlc_onnx
from keras_alexnet import checkpoint, convert, preprocess, weights
from keras_alexnet.model import build_alexnet, feature_model

ort = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed: pip install -e '.[onnx]'")
pytestmark = pytest.mark.slow  # bvlc_alexnet is the paper's net: every conversion and comparison is of 61M parameters.


def max_relative(actual, expected):
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


@pytest.fixture(scope="module")
def crops(photos):
    """The decoded 227 centre crops of the photos, uint8 RGB, as every path below sees them."""
    return np.stack([preprocess.center_crop(preprocess.decode_and_resize(Path(f).read_bytes())).numpy() for f in photos])


@pytest.fixture(scope="module")
def reference(bvlc_onnx, crops):
    """onnxruntime's (probabilities, fc7) of the ONNX graph, fed as Caffe is: BGR minus the BGR mean."""
    session = ort.InferenceSession(str(bvlc_onnx), providers=["CPUExecutionProvider"])
    probabilities, fc7 = session.run(["prob_1", "fc7_relu"], {"data_0": caffe_input(crops)})
    assert probabilities.max() < 0.99 and fc7.max() > 10  # Not saturated: the comparison means something.
    return probabilities, fc7


@pytest.fixture(scope="module")
def caffe(bvlc_onnx):
    return convert.read_onnx(str(bvlc_onnx))


def keras_outputs(model, stats, crops):
    inputs = crops.astype(np.float32) - preprocess.center_crop(tf.constant(stats.mean_image)).numpy()
    return model(inputs, training=False).numpy(), feature_model(model)(inputs, training=False).numpy()


def test_converted_run_matches_onnxruntime(bvlc_run, reference, crops):
    model, run, step = weights.restore_model(str(bvlc_run))
    probabilities, fc7 = keras_outputs(model, preprocess.Stats.load(run.stats_path), crops)
    print(f"\nKeras vs onnxruntime: max abs probability difference {np.abs(probabilities - reference[0]).max():.2e}, "
          f"fc7 max relative difference {max_relative(fc7, reference[1]):.2e}")
    np.testing.assert_allclose(probabilities, reference[0], rtol=0, atol=1e-5)
    assert max_relative(fc7, reference[1]) < 1e-4
    assert step == 0 and run.config["model"] == {"num_classes": 1000, "lrn_bias": 1.0,
                                                 "lrn_alpha": pytest.approx(2e-5), "lrn_across_towers": True}


def test_saved_model_of_the_converted_run_matches_onnxruntime(bvlc_export, reference, photos):
    signatures = tf.saved_model.load(str(bvlc_export)).signatures
    encoded = tf.constant([Path(f).read_bytes() for f in photos])
    probabilities = signatures["predict_images"](image_bytes=encoded)["probabilities"].numpy()
    fc7 = signatures["features_images"](image_bytes=encoded)["fc7"].numpy()
    print(f"\nSavedModel predict_images vs onnxruntime: max abs probability difference "
          f"{np.abs(probabilities - reference[0]).max():.2e}, fc7 max relative difference "
          f"{max_relative(fc7, reference[1]):.2e}")
    np.testing.assert_allclose(probabilities, reference[0], rtol=0, atol=1e-5)
    assert max_relative(fc7, reference[1]) < 1e-4


def test_run_files(bvlc_run):
    stats = preprocess.Stats.load(str(bvlc_run / checkpoint.STATS))
    np.testing.assert_array_equal(stats.mean_image[100, 7], [123, 117, 104])  # Caffe's BGR mean, in RGB.
    np.testing.assert_array_equal(stats.channel_mean, [123, 117, 104])
    if SYNSET_WORDS.exists():
        labels = checkpoint.read_labels(str(bvlc_run / checkpoint.LABELS))
        assert labels == SYNSET_WORDS.read_text().splitlines() and labels[0] == "n01440764 tench, Tinca tinca"
    config = json.loads((bvlc_run / checkpoint.CONFIG).read_text())
    assert config["dataset"] is None and config["mean_bgr"] == [104, 117, 123]


@pytest.mark.parametrize("mistake", ["BGR input", "fc6 rows not permuted", "LRN within each tower",
                                     "the paper's LRN constants"])
def test_each_mapping_detail_matters(caffe, reference, crops, mistake):
    """Each detail of the mapping, done wrong, moves the probabilities far beyond the tolerance."""
    weights, kwargs = convert.tower_weights(caffe), convert.model_kwargs(caffe)
    for t, s in enumerate(("_a", "_b")):
        if mistake == "BGR input":
            weights["conv1" + s][0] = weights["conv1" + s][0][:, :, ::-1]
        elif mistake == "fc6 rows not permuted":  # Caffe's C x H x W order copied as it is.
            weights["fc6" + s][0] = np.split(caffe.layers["fc6"][0], 2)[t].T
    if mistake == "LRN within each tower":
        kwargs["lrn_across_towers"] = False
    elif mistake == "the paper's LRN constants":
        kwargs.update(lrn_bias=2.0, lrn_alpha=1e-4)
    model = build_alexnet(**kwargs)
    for name, values in weights.items():
        model.get_layer(name).set_weights(values)
    probabilities, _ = keras_outputs(model, convert.mean_stats(convert.CAFFE_MEAN_BGR), crops)
    assert np.abs(probabilities - reference[0]).max() > 1e-3


def test_flatten_and_untransposed_gemm_read_alike(caffe, tmp_path):
    """The zoo's files differ in how they flatten pool5 (Reshape, Flatten) and in Gemm's transB."""
    other = convert.read_onnx(str(write_bvlc_onnx(tmp_path / "flatten.onnx", flatten="Flatten", trans_b=0)))
    assert other.lrn == caffe.lrn and list(other.layers) == list(caffe.layers)
    for name, (weight, bias) in caffe.layers.items():
        np.testing.assert_array_equal(other.layers[name][0], weight, err_msg=name)
        np.testing.assert_array_equal(other.layers[name][1], bias, err_msg=name)


@pytest.mark.parametrize("change, message", [
    (("Conv", 1, "group", 1), "conv2 has weights, group, strides, pads, dilations ([256, 48, 5, 5], 1,"),
    (("LRN", 1, "size", 3), "are not bvlc_alexnet's (size 5, beta 0.75, alike)"),
    (("MaxPool", 2, "strides", [3, 3]), "a MaxPool is not 3 x 3 at stride 2"),
])
def test_a_layer_of_another_shape_is_named(bvlc_onnx, tmp_path, change, message):
    import onnx
    kind, index, name, value = change
    model = onnx.load(str(bvlc_onnx))
    node = [n for n in model.graph.node if n.op_type == kind][index]
    node.attribute.remove(next(a for a in node.attribute if a.name == name))
    node.attribute.append(onnx.helper.make_attribute(name, value))
    onnx.save(model, str(tmp_path / "changed.onnx"))
    with pytest.raises(convert.ConversionError, match=re.escape(message)):
        convert.read_onnx(str(tmp_path / "changed.onnx"))


def small_graph(path):
    """An ONNX file that is not bvlc_alexnet: one convolution and a ReLU."""
    from onnx import TensorProto, helper, numpy_helper, save
    weight = numpy_helper.from_array(np.zeros((4, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"]), helper.make_node("Relu", ["y"], ["z"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], [weight])
    save(helper.make_model(graph), str(path))
    return path


@pytest.mark.parametrize("case", ["missing file", "not onnx", "not alexnet", "bad mean", "labels count"])
def test_bad_input_fails_in_one_line(case, bvlc_onnx, tmp_path):
    onnx_file = {"missing file": tmp_path / "nowhere.onnx", "not alexnet": small_graph(tmp_path / "s.onnx"),
                 "not onnx": tmp_path / "notes.onnx"}.get(case, bvlc_onnx)
    (tmp_path / "notes.onnx").write_text("not a protobuf at all")
    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    args = {"bad mean": ["--mean=104,117"], "labels count": [f"--labels={tmp_path / 'labels.txt'}"]}.get(case, [])
    result = run_program("convert", f"--onnx={onnx_file}", f"--model_dir={tmp_path / 'run'}", *args)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    assert {"missing file": "no such ONNX file", "not onnx": "is not a readable ONNX file",
            "not alexnet": "is not bvlc_alexnet: it has layers Conv, 1 Relu",
            "bad mean": "--mean must be three numbers B,G,R",
            "labels count": "has 2 labels for the model's 1000 classes"}[case] in lines[0]


def test_fine_tune_from_the_converted_run(bvlc_run, tmp_path):
    """train --init_from: every layer but fc8 starts from the converted weights, fc8 anew for 10 classes."""
    result = subprocess.run(
        [sys.executable, "-m", "keras_alexnet.train", "--dataset=synthetic", "--batch_size=4", "--epochs=1",
         "--steps_per_epoch=1", "--eval_steps=1", "--learning_rate=1e-9", "--shuffle_buffer=16",
         f"--init_from={bvlc_run}", f"--model_dir={tmp_path / 'tuned'}"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (f"--init_from {bvlc_run}: loaded 14 layers; skipped 1: fc8 (shapes [(4096, 10), (10,)] here, "
            "[(4096, 1000), (1000,)] there)") in result.stdout
    tuned, run, _ = weights.restore_model(str(tmp_path / "tuned"))
    assert run.config["model"]["lrn_bias"] == 1.0 and run.config["model"]["lrn_across_towers"]
    source = weights.restore_model(str(bvlc_run))[0]
    for name in ("conv1_a", "conv3_b", "fc6_a", "fc7_b"):  # One step at lr 1e-9 barely moves them.
        for mine, theirs in zip(tuned.get_layer(name).weights, source.get_layer(name).weights):
            np.testing.assert_allclose(mine.numpy(), theirs.numpy(), rtol=0, atol=1e-6, err_msg=name)
    assert tuned.get_layer("fc8").weights[0].shape == (4096, 10)


def test_init_from_a_directory_that_is_no_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a training run: it has no config.json"):
        weights.architecture(str(tmp_path))
    assert weights.architecture(None) == {}


def test_evaluate_a_converted_run_on_an_imagenet_layout(bvlc_run, reference, photos, tmp_path):
    """evaluate's centre-crop errors of the converted run are those of onnxruntime's probabilities."""
    wnids = [line.split()[0] for line in shared_data("imagenet_labels/synset_words.txt").read_text().splitlines()]
    ranked = np.argsort(-reference[0], axis=1)
    labels = [ranked[0, 0], ranked[1, 3], ranked[2, 50]]  # A top-1 hit, a top-5 hit, a miss.
    (tmp_path / "data" / "train").mkdir(parents=True)
    for wnid in wnids:  # Class folders in WordNet id order: the folder labels are ImageNet's.
        (tmp_path / "data" / "val" / wnid).mkdir(parents=True)
    for photo, label in zip(photos, labels):
        (tmp_path / "data" / "val" / wnids[label] / Path(photo).name).write_bytes(Path(photo).read_bytes())
    result = run_program("evaluate", f"--model_dir={bvlc_run}", f"--dataset={tmp_path / 'data'}", "--batch_size=4",
                         "--noten_crop", f"--output={tmp_path / 'eval.json'}")
    assert result.returncode == 0, result.stderr[-3000:]
    got = json.loads((tmp_path / "eval.json").read_text())["results"]["centre crop"]
    assert got["images"] == 3
    assert got["top1_error"] == pytest.approx(2 / 3) and got["top5_error"] == pytest.approx(1 / 3)
    missing = run_program("evaluate", f"--model_dir={bvlc_run}")
    assert missing.returncode == 1 and missing.stderr.strip().splitlines()[-1] == \
        f"error: {bvlc_run} names no dataset: give --dataset"

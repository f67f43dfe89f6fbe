"""Shared test set-up: GPUs hidden and 4 logical CPU devices (towers, replicas and workers without GPUs),
shared data, and bvlc_alexnet's layout as an ONNX file with its conversion and export (built once a session)."""
import os

os.environ["CUDA_VISIBLE_DEVICES"] = ""  # Before TensorFlow is imported: the suite means the same on a GPU host.
os.environ.pop("KERAS_ALEXNET_VERBOSE", None)  # A developer's quiet switch would quiet pytest's process too.
# oneDNN's large buffers from malloc, not from its BFC pool, which keeps every byte it ever held: a module's
# models are then given back to the system when it ends (free_models). The same kernels and numbers.
os.environ.setdefault("TF_ONEDNN_USE_SYSTEM_ALLOCATOR", "1")

import contextlib  # noqa: E402
import ctypes
import gc
import io
import re
import runpy
import signal
import socket
import subprocess
import sys
import traceback
import warnings
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import app, flags

from keras_alexnet import checkpoint, preprocess

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# build_alexnet(**NARROW): the same layers at 1/16 of the width (~250x fewer parameters), for tests whose
# point is behaviour, not the size of the net; where the size is the point (test_model, test_convert,
# test_export) the tests build the paper's 61M-parameter net.
NARROW = {"width": 1 / 16}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: the slow tier (tens of seconds each); make test-fast skips it")


def pytest_collection_finish(session):
    """What the collected modules imported lives as long as the process: kept out of the garbage
    collector's passes (each full pass walked its 325,000 objects, 0.2 s: every run_program's gc.collect)."""
    gc.collect()
    gc.freeze()


def shared_data(name):
    """SHARED_DATA / name, or the test skipped, naming what is missing."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"no {path} (the shared data set {name.split('/')[0]})")
    return path

# Before any op runs: once devices are initialised the split can no longer be made.
_cpu = tf.config.list_physical_devices("CPU")[0]
if len(tf.config.get_logical_device_configuration(_cpu) or []) < 4:
    tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 4)


@pytest.fixture(scope="session")
def logical_cpus():
    """The names of the 4 logical CPU devices."""
    return [device.name for device in tf.config.list_logical_devices("CPU")]


@pytest.fixture(scope="module", autouse=True)
def free_models():
    """Each AlexNet holds about 1 GB with its optimizer: let a module's models go before the next."""
    yield
    keras.backend.clear_session(free_memory=True)
    gc.collect()
    libc = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
    if hasattr(libc, "malloc_trim"):  # glibc's (not musl's): its freed pages back to the system.
        libc.malloc_trim(0)


@pytest.fixture(scope="session")
def free_port():
    """A function returning a free TCP port on 127.0.0.1."""
    def port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    return port


@pytest.fixture(scope="session")
def final_digest():
    """A function: the trainer's output -> (final weights digest, step)."""
    def parse(output):
        match = re.search(r"final weights digest (\w+) at step (\d+)", output)
        assert match, output[-3000:]
        return match.group(1), int(match.group(2))
    return parse


def write_run(model_dir, model, model_kwargs, class_names, step=7, stats=None, **config):
    """A training run directory as a training run leaves it: config.json (`config` and `model`: model_kwargs),
    labels.txt, stats.npz (ImageNet's by default) and one checkpoint of `model` at `step`."""
    checkpoint.write_run_files(str(model_dir), {**config, "model": model_kwargs}, class_names,
                               stats or preprocess.Stats.imagenet())
    ckpt = tf.train.Checkpoint(model=model, step=tf.Variable(step, dtype=tf.int64))
    tf.train.CheckpointManager(ckpt, str(Path(model_dir) / checkpoint.CHECKPOINTS), max_to_keep=1).save()
    return Path(model_dir)


def reference_errors(model, images, labels, mean_image, ten_crop=False):
    """(top-1, top-5 error) computed with numpy: each image's probabilities are the model's mean over
    its views (the centre crop, or the 10-crop test, of the image minus the mean image)."""
    top1 = top5 = 0
    for image, label in zip(images, labels):
        centred = tf.cast(image, tf.float32) - mean_image
        views = preprocess.ten_crop(centred) if ten_crop else preprocess.center_crop(centred)[None]
        ranking = np.argsort(-model(views, training=False).numpy().mean(0))
        top1 += ranking[0] != label
        top5 += label not in ranking[:5]
    return top1 / len(labels), top5 / len(labels)


# ----------------------------------------------------------------------------- bvlc_alexnet as ONNX

SYNSET_WORDS = SHARED_DATA / "imagenet_labels" / "synset_words.txt"
CAFFE_MEAN_BGR = np.array([104.0, 117.0, 123.0], np.float32)


def run_cli(*args, timeout=600, **kwargs):
    """`python ARGS` in a subprocess, output captured."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, **kwargs)


def run_program(module, *args, cwd=None):
    """`python -m keras_alexnet.MODULE ARGS` run inside this process, as a subprocess.CompletedProcess
    (returncode, stdout, stderr): the module runs as __main__ (runpy) and absl parses ARGS, but without
    a new interpreter and TensorFlow's import (3-4 s each). The flags it defines are removed after.

    train runs here too: the dtype policy and signal handlers it sets are put back after (the global seed
    it sets is not: later tests draw from a seeded state). It runs on this process's 4 logical CPUs, so its
    plan is 2 replicas x 2 towers, not a user's one device: for refusals and for runs whose point is not
    the plan. --cpu_devices and --deterministic, which cannot be undone in a process, and signals are for
    run_cli."""
    assert module != "train" or not any(arg.startswith(("--cpu_devices", "--deterministic")) for arg in args), \
        "--cpu_devices and --deterministic change this process for good: run train with run_cli"
    policy, handlers = keras.mixed_precision.dtype_policy(), {s: signal.getsignal(s) for s in (signal.SIGINT,
                                                                                             signal.SIGTERM)}
    app.define_help_flags()  # As app.run defines them: kept, not removed as the program's flags are.
    flag_values, defined = flags.FLAGS, set(flags.FLAGS)
    stdout, stderr, returncode = io.StringIO(), io.StringIO(), 0
    argv, old_cwd = sys.argv, os.getcwd()
    sys.argv = [f"keras_alexnet/{module}.py", *map(str, args)]
    try:
        if cwd:
            os.chdir(cwd)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), warnings.catch_warnings():
            warnings.filterwarnings("ignore", r".*found in sys.modules", RuntimeWarning)  # runpy's, of an import.
            runpy.run_module(f"keras_alexnet.{module}", run_name="__main__", alter_sys=False)
    except SystemExit as exit_:  # As the interpreter ends: a string is printed, and status 1.
        returncode = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        if isinstance(exit_.code, str):
            stderr.write(exit_.code + "\n")
    except Exception:  # An uncaught error: its traceback, as Python prints it.
        stderr.write(traceback.format_exc())
        returncode = 1
    finally:
        sys.argv = argv
        os.chdir(old_cwd)
        keras.mixed_precision.set_dtype_policy(policy)
        for number, handler in handlers.items():
            signal.signal(number, handler)
        flag_values.unparse_flags()
        for name in set(flag_values) - defined:  # The program's (its module is named after sys.argv[0] above),
            if flag_values.find_module_defining_flag(name, "").startswith("keras_alexnet"):  # not array_record's.
                delattr(flag_values, name)
        gc.collect()  # The program's model and pipelines: gone with it, as with a process.
    return subprocess.CompletedProcess([module, *args], returncode, stdout.getvalue(), stderr.getvalue())


def write_bvlc_onnx(path, seed=0, flatten="Reshape", trans_b=1):
    """bvlc_alexnet's exact layout (Caffe -> Caffe2 -> ONNX zoo) with random weights, written by onnx.helper.

    Input data_0 [N, 3, 227, 227], BGR minus the mean; outputs prob_1 (softmax) and fc7_1 (fc7 after its
    ReLU). conv2, conv4, conv5 are group-2 convolutions; norm1 and norm2 are Caffe's LRN (local_size 5,
    alpha 1e-4, beta 0.75, k 1) over all 96 / 256 maps. Weights are N(0, sqrt(2 / fan_in)) (fc8 smaller,
    so that the softmax is not one-hot), biases N(0.1, 0.05): activations keep a realistic scale.
    """
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(seed)
    initializers, nodes = [], []

    def constant(name, array):
        initializers.append(numpy_helper.from_array(np.asarray(array, np.float32 if array.dtype.kind == "f"
                                                               else array.dtype), name))
        return name

    def layer(op, name, x, shape, gain=2.0, **attrs):
        fan_in = int(np.prod(shape[1:]))
        weight = rng.normal(0, np.sqrt(gain / fan_in), shape)
        if op == "Gemm" and not trans_b:
            weight, attrs["transB"] = weight.T, 0
        elif op == "Gemm":
            attrs["transB"] = 1
        bias = rng.normal(0.1, 0.05, shape[0])
        nodes.append(helper.make_node(op, [x, constant(f"{name}_w_0", weight), constant(f"{name}_b_0", bias)],
                                      [f"{name}_1"], **attrs))
        return f"{name}_1"

    def node(op, x, out, **attrs):
        nodes.append(helper.make_node(op, [x] if isinstance(x, str) else x, [out], **attrs))
        return out

    def lrn(x, name):
        return node("LRN", x, name, size=5, alpha=1e-4, beta=0.75, bias=1.0)

    x = layer("Conv", "conv1", "data_0", (96, 3, 11, 11), kernel_shape=[11, 11], strides=[4, 4], pads=[0] * 4)
    x = node("MaxPool", lrn(node("Relu", x, "relu1"), "norm1"), "pool1", kernel_shape=[3, 3], strides=[2, 2],
             pads=[0, 0, 1, 1])  # Caffe's ceil rounding, as Caffe2 writes it.
    x = layer("Conv", "conv2", x, (256, 48, 5, 5), kernel_shape=[5, 5], pads=[2] * 4, group=2)
    x = node("MaxPool", lrn(node("Relu", x, "relu2"), "norm2"), "pool2", kernel_shape=[3, 3], strides=[2, 2])
    x = node("Relu", layer("Conv", "conv3", x, (384, 256, 3, 3), kernel_shape=[3, 3], pads=[1] * 4), "relu3")
    x = node("Relu", layer("Conv", "conv4", x, (384, 192, 3, 3), kernel_shape=[3, 3], pads=[1] * 4, group=2),
             "relu4")
    x = node("Relu", layer("Conv", "conv5", x, (256, 192, 3, 3), kernel_shape=[3, 3], pads=[1] * 4, group=2),
             "relu5")
    x = node("MaxPool", x, "pool5", kernel_shape=[3, 3], strides=[2, 2])
    if flatten == "Reshape":
        x = node("Reshape", [x, constant("OC2_DUMMY_1", np.array([-1, 9216], np.int64))], "pool5_flat")
    else:
        x = node("Flatten", x, "pool5_flat", axis=1)
    x = node("Dropout", node("Relu", layer("Gemm", "fc6", x, (4096, 9216)), "relu6"), "drop6")
    fc7 = node("Relu", layer("Gemm", "fc7", x, (4096, 4096)), "fc7_relu")
    x = layer("Gemm", "fc8", node("Dropout", fc7, "drop7"), (1000, 4096), gain=0.02)
    node("Softmax", x, "prob_1", axis=1)
    outputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", size])
               for name, size in (("prob_1", 1000), ("fc7_relu", 4096))]
    graph = helper.make_graph(nodes, "bvlc_alexnet", [helper.make_tensor_value_info(
        "data_0", TensorProto.FLOAT, ["N", 3, 227, 227])], outputs, initializers)
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)]), str(path))
    return path


def caffe_input(crops):
    """What Caffe feeds bvlc_alexnet for RGB uint8 crops [N, 227, 227, 3]: BGR minus the mean, NCHW."""
    return np.ascontiguousarray((crops[..., ::-1].astype(np.float32) - CAFFE_MEAN_BGR).transpose(0, 3, 1, 2))


@pytest.fixture(scope="session")
def photos():
    """The shared real photos (chelsea, coffee, rocket)."""
    files = sorted(str(p) for p in shared_data("skimage_photos").glob("*") if p.suffix in (".png", ".jpg"))
    assert files, "the shared skimage_photos data set has no photos"
    return files


@pytest.fixture(scope="session")
def bvlc_onnx(tmp_path_factory):
    """The random-weight bvlc_alexnet ONNX file of the session."""
    pytest.importorskip("onnx", reason="the onnx extra is not installed: pip install -e '.[onnx]'")
    return write_bvlc_onnx(tmp_path_factory.mktemp("onnx") / "bvlcalexnet-test.onnx")


@pytest.fixture(scope="session")
def bvlc_run(bvlc_onnx, tmp_path_factory):
    """The ONNX file converted by the command line, with ImageNet's labels where the shared data has them."""
    model_dir = tmp_path_factory.mktemp("bvlc") / "run"
    labels = [f"--labels={SYNSET_WORDS}"] if SYNSET_WORDS.exists() else []
    result = run_cli("-m", "keras_alexnet.convert", f"--onnx={bvlc_onnx}", f"--model_dir={model_dir}", *labels)
    assert result.returncode == 0, result.stderr[-3000:]
    return model_dir


@pytest.fixture(scope="session")
def bvlc_export(bvlc_run, tmp_path_factory):
    """The converted run exported by the command line: EXPORT_DIR/0 (the conversion is step 0)."""
    export_dir = tmp_path_factory.mktemp("bvlc_export") / "alexnet"
    result = run_cli("-m", "keras_alexnet.export", f"--model_dir={bvlc_run}", f"--export_dir={export_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return export_dir / "0"

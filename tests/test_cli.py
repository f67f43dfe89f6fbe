"""Every command reports bad input as one line `error: ...` with exit status 1, never a traceback; a bug
keeps its traceback. A command's output is its own lines, without TensorFlow's log."""
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import conftest
from keras_alexnet import checkpoint, cli, preprocess
from keras_alexnet.errors import UserError

# Root ignores chmod, so a read-only place is one no user may write: sysfs refuses new entries.
READ_ONLY = "/sys/keras_alexnet_run"
needs_sysfs = pytest.mark.skipif(not os.path.ismount("/sys"), reason="no sysfs at /sys for a read-only path")


def spawn_program(module, *args, env=None):
    """`python -m keras_alexnet.MODULE ARGS` in a new process: train, and what is printed at import."""
    return subprocess.run([sys.executable, "-m", f"keras_alexnet.{module}", *args], capture_output=True,
                          text=True, timeout=240, env=env)


def assert_one_line(result, *words):
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and len(errors) == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    for word in words:
        assert word in errors[0], errors[0]


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("a file, not a folder")
    return str(path)


@pytest.mark.parametrize("case", ["a file", "below a file", pytest.param("read-only", marks=needs_sysfs)])
def test_train_model_dir_that_cannot_be_written(case, a_file):
    model_dir = {"a file": a_file, "below a file": f"{a_file}/run", "read-only": READ_ONLY}[case]
    result = conftest.run_program("train", "--dataset=synthetic", "--batch_size=4", "--steps_per_epoch=1",
                                  "--eval_steps=1", "--epochs=1", f"--model_dir={model_dir}")
    assert_one_line(result, {"a file": f"{a_file} is not a directory", "below a file": f"{a_file} is not a directory",
                             "read-only": READ_ONLY}[case])


def test_train_stats_that_is_a_text_file(a_file):
    result = conftest.run_program("train", "--dataset=synthetic", f"--stats={a_file}", f"--model_dir={a_file}.run")
    assert_one_line(result, f"statistics file {a_file} is not an .npz of python -m keras_alexnet.stats")


def test_an_odd_number_of_devices_for_two_towers_names_the_unused_one(tmp_path):
    result = spawn_program("train", "--dataset=synthetic", "--cpu_devices=3", "--towers_per_replica=2",
                         f"--model_dir={tmp_path}")
    assert_one_line(result, "/device:CPU:2 would be left unused")
    assert not list(tmp_path.iterdir())  # Refused before anything was written.


@needs_sysfs
def test_stats_output_on_a_read_only_path(tmp_path):
    (tmp_path / "data" / "only").mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "data" / "only" / "a.png")
    result = conftest.run_program("stats", f"--dataset={tmp_path / 'data'}", f"--output={READ_ONLY}.npz")
    assert_one_line(result, READ_ONLY)


@pytest.mark.parametrize("module", ["embed", "filters"])
def test_a_file_where_a_folder_belongs(module, a_file, tmp_path):
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    args = {"embed": [f"--saved_model={a_file}", f"--images={tmp_path / 'images'}", f"--logdir={tmp_path / 'logs'}"],
            "filters": [f"--model_dir={a_file}", f"--output={tmp_path / 'f.png'}"]}[module]
    assert_one_line(conftest.run_program(module, *args), a_file)


def test_a_user_error_raised_in_a_numpy_function_is_one_line_and_a_bug_after_it_is_not():
    """sources.py reads array_record files in a tf.numpy_function: a DataError raised there reaches the
    program inside an OpError's message, with the function's traceback. The error that ended the traceback
    decides: a bug raised while handling a DataError, or another library's DataError, is a bug."""
    class DataError(Exception):  # Not ours: its module is this test's.
        pass

    def error_of(function):
        dataset = tf.data.Dataset.range(1).map(lambda i: tf.numpy_function(function, [i], tf.int64))
        with pytest.raises(tf.errors.OpError) as raised:
            list(dataset)
        return raised.value

    def ours(_):
        raise preprocess.DataError("shard-00001 cannot be read (hash mismatch): prepare it again")

    def bug_while_handling_ours(_):
        try:
            ours(_)
        except preprocess.DataError:
            raise KeyError("a bug")

    def another_librarys(_):
        raise DataError("not ours")

    error = error_of(ours)
    assert cli.is_bad_input(error) and \
        cli.one_line(error) == "shard-00001 cannot be read (hash mismatch): prepare it again"
    for function in (bug_while_handling_ours, another_librarys):
        error = error_of(function)
        assert not cli.is_bad_input(error) and cli.raised_in_graph(error) is None, error.message


def test_errors_are_one_line_and_interrupts_exit_130(capsys):
    def main_raising(error):
        @cli.reports_errors
        def main(argv):
            raise error
        with pytest.raises(SystemExit) as exit_:
            main([])
        return exit_.value.code

    op_error = tf.errors.FailedPreconditionError(None, None, "runs/x is not a directory\n\tgraph context ...")
    assert main_raising(op_error) == "error: runs/x is not a directory"
    assert main_raising(FileNotFoundError(2, "No such file or directory", "x.npz")) == \
        "error: [Errno 2] No such file or directory: 'x.npz'"
    assert main_raising(UserError("--x must be positive")) == "error: --x must be positive"
    assert main_raising(tf.errors.NotFoundError(None, None, "x.npz; No such file or directory")) == \
        "error: x.npz; No such file or directory"
    assert main_raising(tf.errors.InvalidArgumentError(None, None, "Graph execution error:\n\nDetected at node a\n"
                                                       "assertion failed: [not a JPEG image]\n\t [[{{node a}}]]")) == \
        "error: not a JPEG image"  # Our own tf.debugging.Assert, e.g. preprocess.decode's.
    assert main_raising(tf.errors.ResourceExhaustedError(None, None, "x; No space left on device")) == \
        "error: x; No space left on device"
    assert main_raising(KeyboardInterrupt()) == 130 and capsys.readouterr().err == "interrupted\n"
    for bug in [ZeroDivisionError(), ValueError("boom"), tf.errors.InvalidArgumentError(None, None, "Incompatible "
                "shapes: [2] vs. [3]"), tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor")]:
        with pytest.raises(type(bug)):  # A bug keeps its traceback.
            main_raising(bug)


def test_programs_let_gpu_memory_grow(monkeypatch):
    """Set before a program's first op (and its strategy): a process takes GPU memory as it needs it."""
    monkeypatch.delenv("TF_FORCE_GPU_ALLOW_GROWTH", raising=False)
    assert cli.reports_errors(lambda: os.environ.get("TF_FORCE_GPU_ALLOW_GROWTH"))() == "true"


@pytest.mark.parametrize("error", [ValueError, UserError])
def test_a_bug_inside_a_program_keeps_its_traceback(error, monkeypatch, tmp_path):
    """A ValueError from deep inside (TensorFlow, Keras, numpy or ours) is no bad input; a UserError is."""
    def read_run_files(model_dir):
        raise error("boom")

    monkeypatch.setattr(checkpoint, "read_run_files", read_run_files)  # What evaluate's weights.restore_model calls.
    result = conftest.run_program("evaluate", f"--model_dir={tmp_path}")
    assert result.returncode == 1
    if error is UserError:
        assert "Traceback" not in result.stderr and result.stderr.splitlines() == ["error: boom"], result.stderr
    else:
        assert "Traceback" in result.stderr and result.stderr.splitlines()[-1] == "ValueError: boom", result.stderr


# TensorFlow's C++ log (I0000 ..., E0000 ... failed call to cuInit), absl's (I1201 12:00:00.0 ...), its Python
# loggers' and deprecation warnings.
FOREIGN = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d|I0000|W0000|E0000|INFO:tensorflow|WARNING:tensorflow|deprecat",
                     re.IGNORECASE | re.MULTILINE)


@pytest.mark.slow
def test_programs_print_only_their_own_lines(tmp_path):
    """A one-step train and an export of it, as a user runs them; KERAS_ALEXNET_VERBOSE=1 brings TensorFlow's
    lines back (on any machine the SavedModel's "INFO:tensorflow:Assets written to ...")."""
    env = {k: v for k, v in os.environ.items() if k not in ("KERAS_ALEXNET_VERBOSE", "TF_CPP_MIN_LOG_LEVEL")}
    run, export_dir = tmp_path / "run", tmp_path / "export"
    train = spawn_program("train", "--dataset=synthetic", "--batch_size=2", "--steps_per_epoch=1", "--eval_steps=1",
                        "--epochs=1", f"--width={conftest.NARROW['width']}", f"--model_dir={run}", env=env)
    export = [f"--model_dir={run}", f"--export_dir={export_dir}"]
    quiet, verbose = spawn_program("export", *export, env=env), spawn_program(
        "export", *export, env={**env, "KERAS_ALEXNET_VERBOSE": "1"})
    for result in (train, quiet, verbose):
        assert result.returncode == 0, result.stderr[-3000:]
    for result in (train, quiet):
        assert not FOREIGN.search(result.stdout + result.stderr), result.stdout + result.stderr
    assert FOREIGN.search(verbose.stderr), verbose.stderr

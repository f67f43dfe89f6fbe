"""A run directory has one owner, and no tool writes into a run it did not make."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
import tensorflow as tf

from conftest import run_program, write_run
from keras_alexnet import checkpoint, convert, preprocess
from keras_alexnet.model import build_alexnet

TRAIN = [sys.executable, "-m", "keras_alexnet.train", "--dataset=synthetic", "--width=0.0625", "--batch_size=8",
         "--steps_per_epoch=300", "--epochs=1", "--eval_steps=1", "--steps_per_loop=1"]


@pytest.mark.slow
def test_a_second_train_on_one_run_is_refused_and_a_killed_ones_lock_is_taken_over(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([*TRAIN, f"--model_dir={run}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True)
    deadline = time.time() + 180
    while not (run / "config.json").exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    assert first.poll() is None, "the first run ended before the second started"
    second = run_program("train", *TRAIN[3:], f"--model_dir={run}")
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert second.returncode == 1 and errors == [
        f"error: {run} is in use by process {first.pid} on {os.uname().nodename}: one process at a time writes a "
        "run (wait for it to end, or stop it)"], second.stderr[-2000:]
    first.send_signal(signal.SIGKILL)
    first.wait()
    again = subprocess.Popen([*TRAIN, f"--model_dir={run}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    for line in again.stdout:  # It holds the lock and trains: enough, stop it as a scheduler would.
        if re.search(r" step \d+/300: ", line):
            break
    again.send_signal(signal.SIGTERM)
    rest = again.communicate(timeout=120)[0]
    assert again.returncode == 0 and "SIGTERM: stopped at step" in rest, rest[-3000:]


@pytest.mark.slow
def test_convert_refuses_a_training_run_and_replaces_its_own_whole(tmp_path, bvlc_onnx):
    onnx = bvlc_onnx
    run = tmp_path / "run"
    checkpoint.write_run_files(str(run), {"model": {}, "dataset": "synthetic"}, ["a", "b"], preprocess.Stats.imagenet())
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "ckpt-2.index").write_bytes(b"a training run's")
    before = sorted(p.name for p in run.rglob("*") if p.name != checkpoint.LOCK)  # Any writer may lock a run.
    result = run_program("convert", f"--onnx={onnx}", f"--model_dir={run}")
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == (
        f"error: {run} holds files but no converted run (a training run?): convert into a new or empty --model_dir")
    assert sorted(p.name for p in run.rglob("*") if p.name != checkpoint.LOCK) == before
    converted = tmp_path / "bvlc"
    convert.convert(str(onnx), str(converted))
    (converted / checkpoint.HISTORY).write_text('{"epoch": 1}\n')  # As a fine-tuning run in it would leave.
    convert.convert(str(onnx), str(converted))
    assert not (converted / checkpoint.HISTORY).exists()
    assert json.loads((converted / checkpoint.CONFIG).read_text())["converted_from"] == str(onnx)
    assert sorted(os.listdir(converted / "checkpoints")) == ["checkpoint", "ckpt-1.data-00000-of-00001",
                                                              "ckpt-1.index"]
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # No staging left behind.


def damage(run, how):
    """Damages the newest of a run's checkpoints: `cut` 110 bytes off its .data, deletes its `index`,
    or overwrites `bytes` in the middle of its .data."""
    newest = tf.train.latest_checkpoint(run / "checkpoints")
    data = Path(f"{newest}.data-00000-of-00001")
    if how == "cut":
        data.write_bytes(data.read_bytes()[:-110])
    elif how == "index":
        Path(f"{newest}.index").unlink()
    else:
        content = bytearray(data.read_bytes())
        content[len(content) // 2:len(content) // 2 + 64] = bytes(64)
        data.write_bytes(bytes(content))
    return Path(newest).name


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A narrow run with checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("run")
    done = run_program("train", *TRAIN[3:], f"--model_dir={run}", "--steps_per_epoch=4", "--checkpoint_every=2")
    assert done.returncode == 0, done.stderr[-3000:]
    return run


@pytest.mark.slow
@pytest.mark.parametrize("how", ["cut", "index", "bytes"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(two_checkpoints, tmp_path, how):
    """filters (the quickest reader) falls back from each kind of damage. For a cut file, what a kill in the
    middle of a write leaves, so do the other readers of a run (all three read through weights.restore_model,
    so through checkpoint.restore_intact) and the trainer's resume (restore_intact too)."""
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    damaged = damage(run, how)
    assert damaged == "ckpt-4"
    readers = [("filters", [f"--output={tmp_path / 'filters.png'}"]), ("evaluate", []),
               ("export", [f"--export_dir={tmp_path / 'export'}"])]
    for program, args in readers if how == "cut" else readers[:1]:
        result = run_program(program, f"--model_dir={run}", *args)
        assert result.returncode == 0, (program, result.stderr[-3000:])
        [line] = [line for line in result.stdout.splitlines() if line.startswith("damaged checkpoint")]
        assert line.startswith("damaged checkpoint ckpt-4 (") and line.endswith("): using ckpt-2"), line
    if how != "cut":
        return
    assert (tmp_path / "export" / "2").is_dir()  # The version is the checkpoint's step.
    resumed = run_program("train", *TRAIN[3:], f"--model_dir={run}", "--steps_per_epoch=4", "--checkpoint_every=2",
                          "--epochs=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "damaged checkpoint ckpt-4 (" in resumed.stdout and "epoch 1/2: 2 steps" in resumed.stdout
    assert tf.train.latest_checkpoint(run / "checkpoints").endswith("ckpt-8")


@pytest.mark.slow
def test_a_checkpoint_is_chosen_by_its_step(two_checkpoints, tmp_path):
    result = run_program("export", f"--model_dir={two_checkpoints}", "--checkpoint=2",
                     f"--export_dir={tmp_path}")
    assert result.returncode == 0 and (tmp_path / "2").is_dir(), result.stderr[-2000:]
    result = run_program("evaluate", f"--model_dir={two_checkpoints}", "--checkpoint=3")
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == (
        f"error: {two_checkpoints}/checkpoints has no checkpoint of step 3 (it has: 2, 4)")


@pytest.mark.slow
def test_sigterm_in_the_last_epochs_validation_saves_and_stops_at_once(tmp_path):
    """Validation of 64 batches, interrupted: the run saves its step and exits 0 within seconds (it
    finished the validation and the next epoch first, or never acted in the last epoch); the resumed
    run validates that epoch anew, once."""
    run = tmp_path / "run"
    args = ["--steps_per_epoch=3", "--eval_steps=64", f"--model_dir={run}"]
    process = subprocess.Popen([*TRAIN[:-3], "--epochs=1", "--steps_per_loop=1", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    for line in process.stdout:  # The last loop's line: validation starts.
        if "step 3/3" in line:
            break
    time.sleep(1.0)
    signalled = time.perf_counter()
    process.send_signal(signal.SIGTERM)
    rest = process.stdout.read()
    process.wait(timeout=120)
    delay = time.perf_counter() - signalled
    print(f"\nSIGTERM in validation: exited {delay:.1f} s after the signal")
    assert process.returncode == 0 and "SIGTERM: stopped at step 3" in rest and "epoch 1:" not in rest, rest
    assert delay < 20 and not (run / checkpoint.HISTORY).exists()
    resumed = run_program("train", *TRAIN[3:-3], "--epochs=1", "--steps_per_loop=1", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    [epoch] = [json.loads(line) for line in (run / checkpoint.HISTORY).read_text().splitlines()]
    assert (epoch["epoch"], epoch["step"], epoch["validation"]["images"]) == (1, 3, 64 * 8)


@pytest.fixture
def small_disk(tmp_path):
    """A 2.5 MB tmpfs: room for a narrow run's files, not for its first checkpoint (1.7 MB of variables)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2500k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_leaves_no_partial_save(small_disk):
    run = small_disk / "run"
    args = [*TRAIN[3:-4], "--steps_per_epoch=4", "--checkpoint_every=2", "--epochs=1", "--eval_steps=1",
            f"--model_dir={run}"]
    for attempt in range(2):  # The second starts beside a partial save that a kill left.
        result = run_program("train", *args)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 1 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert re.fullmatch(rf"error: no space left on device for a checkpoint in {run}/checkpoints: it takes about "
                            r"1\.7 MB, 1\.\d MB are free; make room and run the same command to resume", errors[0])
        assert os.listdir(run / "checkpoints") == []  # TensorFlow's ckpt-2_temp/ is gone.
        (run / "checkpoints" / "ckpt-9_temp").mkdir()


@pytest.mark.slow
def test_sigterm_while_the_cache_fills_stops_within_seconds(tmp_path):
    """The fill of 2,560 images takes a minute; SIGTERM ends it within 64 images, exit 0, and leaves
    no partial cache file."""
    cache = tmp_path / "images.npy"
    process = subprocess.Popen([*TRAIN, f"--model_dir={tmp_path / 'run'}", f"--cache={cache}"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 180
    while not (tmp_path / ".images.npy.tmp").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.1)
    time.sleep(1.0)
    signalled = time.perf_counter()
    process.send_signal(signal.SIGTERM)
    out = process.communicate(timeout=120)[0]
    delay = time.perf_counter() - signalled
    print(f"\nSIGTERM in the cache fill: exited {delay:.1f} s after the signal")
    assert process.returncode == 0 and "SIGTERM: stopped filling the" in out, out[-2000:]
    assert delay < 20 and not cache.exists() and not (tmp_path / ".images.npy.tmp").exists()


@pytest.mark.slow
def test_a_damaged_config_json_names_itself(two_checkpoints, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    damaged = (run / checkpoint.CONFIG).read_text().replace('"batch_size": 8,', '"batch_size": 8,,')
    (run / checkpoint.CONFIG).write_text(damaged)
    with pytest.raises(json.JSONDecodeError) as error:  # Where Python's json parser stops.
        json.loads(damaged)
    where = f"line {error.value.lineno}, column {error.value.colno}: {error.value.msg}"
    for program in ("evaluate", "export", "train"):
        args = f"--model_dir={run}", f"--export_dir={tmp_path / 'x'}" if program == "export" else "--dataset=synthetic"
        result = run_program(program, *args)
        assert result.returncode == 1 and result.stderr.strip().splitlines()[-1].startswith(
            f"error: {run}/config.json is damaged: {where} (it holds"), \
            (program, result.stderr[-1500:])


@pytest.mark.parametrize("flag, message", [
    ("--model_dir=", "--model_dir must not be empty: name the run's directory"),
    ("--weight_decay=nan", "--weight_decay must be a finite number, got nan"),
    ("--learning_rate=inf", "--learning_rate must be a finite number, got inf"),
    ("--momentum=-0.5", "--momentum must be in [0, 1), got -0.5"),
    ("--width=0", "--width must be positive, got 0.0"),
    ("--cache=none", "--cache must be 'memory' or an .npy file path, got 'none' (leave it out for no cache)"),
])
def test_flags_no_run_can_use_are_refused_before_anything_is_written(tmp_path, flag, message):
    result = run_program("train", *TRAIN[3:], f"--model_dir={tmp_path / 'run'}", flag, cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == f"error: {message}", result.stderr
    assert os.listdir(tmp_path) == []


def test_a_saved_model_with_our_signature_names_but_other_outputs_is_named(tmp_path):
    """Another model's SavedModel under our signature names: one line, not KeyError: 'probabilities'."""
    module = tf.Module()
    module.predict_images = tf.function(lambda image_bytes: {"logits": tf.zeros([tf.size(image_bytes), 3])},
                                        input_signature=[tf.TensorSpec([None], tf.string)])
    module.features = tf.function(lambda images: {"pool5": tf.zeros([tf.shape(images)[0], 9])},
                                  input_signature=[tf.TensorSpec([None, 227, 227, 3], tf.float32)])
    tf.saved_model.save(module, str(tmp_path / "foreign"), signatures={
        "predict_images": module.predict_images, "features": module.features})
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 48)).save(tmp_path / "images" / "a.png")
    for program, args, output, signature in [
            ("predict", [str(tmp_path / "images")], "probabilities", "predict_images"),
            ("embed", [f"--images={tmp_path / 'images'}", f"--logdir={tmp_path / 'emb'}"], "fc7", "features")]:
        result = run_program(program, f"--saved_model={tmp_path / 'foreign'}", *args)
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert result.stderr.strip().splitlines()[-1] == (
            f"error: {tmp_path / 'foreign'} has no output {output!r} in signature {signature!r} (it has: "
            f"{'logits' if output == 'probabilities' else 'pool5'}): not a keras_alexnet export")


def test_a_directory_written_whole_also_when_named_with_a_slash(tmp_path):
    from keras_alexnet.files import atomic_write
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with atomic_write(f"{tmp_path / 'out'}/") as staging:
        os.makedirs(staging)
        Path(staging, "new.txt").write_text("new")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == ["new.txt"]


def test_checkpoints_of_another_network_than_config_json_describes_are_one_line(tmp_path):
    """A config.json edited to another width (or copied from another run): one line naming both shapes."""
    run = write_run(tmp_path / "run", build_alexnet(num_classes=3, width=1 / 16), {"num_classes": 3, "width": 1 / 16},
                    ["a", "b", "c"])
    config = json.loads((run / checkpoint.CONFIG).read_text())
    config["model"]["width"] = 1 / 8
    (run / checkpoint.CONFIG).write_text(json.dumps(config))
    result = run_program("evaluate", f"--model_dir={run}")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {run}/checkpoints/ckpt-1 holds the weights of another network than {run}/config.json describes "
        "(Received incompatible tensor with shape (11, 11, 3, 3) when attempting to restore variable with shape "
        "(11, 11, 3, 6) and name conv1_a/conv1_a/kernel:0.): a config.json edited or copied from another run?")

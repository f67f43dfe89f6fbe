"""A run directory has one owner, and no tool writes into a run it did not make."""
import json
import os
import signal
import subprocess
import sys
import time

from conftest import run_cli
from keras_alexnet import checkpoint, convert, preprocess

TRAIN = [sys.executable, "-m", "keras_alexnet.train", "--dataset=synthetic", "--width=0.0625", "--batch_size=8",
         "--steps_per_epoch=300", "--epochs=1", "--eval_steps=1", "--steps_per_loop=1"]


def test_a_second_train_on_one_run_is_refused_and_a_killed_ones_lock_is_taken_over(tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([*TRAIN, f"--model_dir={run}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True)
    deadline = time.time() + 180
    while not (run / "config.json").exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    assert first.poll() is None, "the first run ended before the second started"
    second = subprocess.run([*TRAIN, f"--model_dir={run}"], capture_output=True, text=True, timeout=300)
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert second.returncode == 1 and errors == [
        f"error: {run} is in use by process {first.pid} on {os.uname().nodename}: one process at a time writes a "
        "run (wait for it to end, or stop it)"], second.stderr[-2000:]
    first.send_signal(signal.SIGKILL)
    first.wait()
    again = subprocess.run([*TRAIN, f"--model_dir={run}", "--steps_per_epoch=300"], capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "final weights digest" in again.stdout


def test_convert_refuses_a_training_run_and_replaces_its_own_whole(tmp_path, bvlc_onnx):
    onnx = bvlc_onnx
    run = tmp_path / "run"
    checkpoint.write_run_files(str(run), {"model": {}, "dataset": "synthetic"}, ["a", "b"], preprocess.Stats.imagenet())
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "ckpt-2.index").write_bytes(b"a training run's")
    before = sorted(p.name for p in run.rglob("*"))
    result = run_cli("-m", "keras_alexnet.convert", f"--onnx={onnx}", f"--model_dir={run}")
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == (
        f"error: {run} holds files but no converted run (a training run?): convert into a new or empty --model_dir")
    assert sorted(p.name for p in run.rglob("*")) == before
    converted = tmp_path / "bvlc"
    convert.convert(str(onnx), str(converted))
    (converted / checkpoint.HISTORY).write_text('{"epoch": 1}\n')  # As a fine-tuning run in it would leave.
    convert.convert(str(onnx), str(converted))
    assert not (converted / checkpoint.HISTORY).exists()
    assert json.loads((converted / checkpoint.CONFIG).read_text())["converted_from"] == str(onnx)
    assert sorted(os.listdir(converted / "checkpoints")) == ["checkpoint", "ckpt-1.data-00000-of-00001",
                                                              "ckpt-1.index"]
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # No staging left behind.

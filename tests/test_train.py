"""The training loop: section 5's update rule, op placement, resume, signals, multi-worker, errors."""
import dataclasses
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import NARROW, run_program
from keras_alexnet import checkpoint, distribute, model, preprocess, summaries, trainer
from keras_alexnet.config import PRESETS, Config
from keras_alexnet.model import build_alexnet, tower_variables
from keras_alexnet.epoch_rules import TrainingStuck, check_stuck, is_stuck, stuck_warning, update_learning_rate
from keras_alexnet.optimizer import PaperSGD
from keras_alexnet.step import WarmupThenPlateau, make_train_step

REPO = Path(__file__).resolve().parents[1]

# Small, fast runs: tiny batches, few steps, a capped validation pass, the narrow net (conftest.NARROW).
FAST = ["--dataset=synthetic", "--batch_size=8", "--steps_per_epoch=4", "--eval_steps=2",
        "--init=caffe", "--cpu_devices=2", "--shuffle_buffer=64", f"--width={NARROW['width']}"]
# Runs that a signal must find mid-way: 40 steps of the narrow net, seconds (a later flag wins).
LONGER = ["--epochs=2", "--steps_per_epoch=20"]


def run_trainer(model_dir, *args, env=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "keras_alexnet.train", *FAST, f"--model_dir={model_dir}", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def replica_plan(logical_cpus):
    cpu0, cpu1, cpu2, cpu3 = logical_cpus
    return distribute.mirrored_strategy([cpu0, cpu1]), {cpu0: [cpu0, cpu2], cpu1: [cpu1, cpu3]}


@pytest.fixture(scope="module")
def step_setup(replica_plan):
    strategy, plan = replica_plan
    # A large weight decay, so that its term is as big as the gradient's and a missing one shows. A quarter of the
    # width: at 1/16 Caffe's fillers pass no gradient to some layers (conv2_a's bias), and a decayed bias would
    # not show (Glorot's biases start at 0).
    config = Config(batch_size=4, dropout_rate=0.0, learning_rate=0.01, momentum=0.9, weight_decay=0.5)
    with tower_variables(), strategy.scope():
        model = build_alexnet(10, tower_devices=plan, dropout_rate=0.0, init="caffe", seed=3, width=1 / 4)
        optimizer = PaperSGD(config.learning_rate, momentum=config.momentum, weight_decay=config.weight_decay)
        optimizer.build(model.trainable_variables)
    return strategy, model, optimizer, config, make_train_step(strategy, model, optimizer, config)


def test_two_steps_follow_the_papers_update_rule(step_setup):
    """v <- 0.9 v - 0.0005 eps w - eps dL/dw; w <- w + v, with dL/dw of the global-batch mean loss."""
    strategy, model, optimizer, config, step = step_setup
    reference = build_alexnet(10, dropout_rate=0.0, init="caffe", seed=99, width=1 / 4)
    rng = np.random.default_rng(0)
    images = rng.normal(0, 60, (4, 227, 227, 3)).astype("float32")
    labels = np.array([0, 3, 5, 9], "int32")
    w = [v.numpy() for v in model.trainable_variables]
    velocity = [np.zeros_like(x) for x in w]
    for _ in range(2):
        reference.set_weights(w)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, reference(images)))
        grads = tape.gradient(loss, reference.trainable_variables)
        decay = [0.0 if "bias" in v.path else config.weight_decay for v in reference.trainable_variables]
        velocity = [config.momentum * v - d * config.learning_rate * x - config.learning_rate * g.numpy()
                    for v, x, g, d in zip(velocity, w, grads, decay)]
        expected = [x + v for x, v in zip(w, velocity)]
        batch = next(iter(strategy.experimental_distribute_dataset(  # Two images per replica.
            tf.data.Dataset.from_tensors((images, labels)))))
        step(*batch)
        w = [v.numpy() for v in model.trainable_variables]
        for got, want, before, v in zip(w, expected, [x - v for x, v in zip(expected, velocity)],
                                        model.trainable_variables):
            update, want_update = got - before, want - before
            scale = np.abs(want_update).max()
            assert scale > 0, v.path
            np.testing.assert_allclose(update, want_update, atol=1e-2 * scale, err_msg=v.path)


def test_each_towers_backward_pass_runs_on_its_own_device(step_setup, replica_plan, logical_cpus):
    _, _, _, _, step = step_setup
    graph = step.get_concrete_function(tf.TensorSpec([4, 227, 227, 3]), tf.TensorSpec([4], tf.int32)).graph
    backward = [op for op in graph.get_operations()
                if op.type in ("Conv2DBackpropFilter", "Conv2DBackpropInput", "MatMul") and "gradients" in op.name]
    assert len(backward) > 40
    checked = 0
    for op in backward:
        tower = re.search(r"(conv\d|fc\d|lrn\d)_(a|b)", op.name)
        if not tower:
            continue
        replica = 1 if op.name.startswith("replica_1/") else 0
        expected = logical_cpus[replica + (2 if tower.group(2) == "b" else 0)]
        assert tf.DeviceSpec.from_string(op.device).device_index == \
            tf.DeviceSpec.from_string(expected).device_index, (op.name, op.device)
        checked += 1
    assert checked > 30


def test_stuck_run_detector_thresholds():
    assert is_stuck(np.log(10) * 1.01, 10)
    assert is_stuck(6.9, 1000)
    assert not is_stuck(np.log(10) * 0.97, 10)
    assert not is_stuck(1.9, 10)


def test_the_demo_is_as_small_as_the_readme_says():
    """make train: about 4,000 images in all, so that it takes minutes on a 2-core laptop."""
    demo = PRESETS["demo"]()
    epochs, steps, batch, evals = demo.epochs, demo.steps_per_epoch, demo.batch_size, demo.eval_steps
    images = epochs * (steps + evals) * batch
    assert images <= 4000 and demo.cache == "memory" and demo.dataset == "synthetic"
    assert "keras_alexnet.train --preset=demo" in (REPO / "Makefile").read_text()
    readme = (REPO / "README.md").read_text()
    assert f"{epochs} epochs of {steps * batch:,} synthetic training images" in readme
    assert f"{evals * batch} validation images" in readme and f"{images:,} images in all" in readme


def test_stuck_runs_are_judged_by_steps_taken():
    """A small dataset at chance after 3 short epochs is not stopped; after --stuck_steps it is."""
    config = Config(stuck_steps=300)
    assert stuck_warning(1, 2.3, 10) is None and stuck_warning(2, 2.3, 10).startswith("warning: training loss 2.300")
    check_stuck(3, 30, config)  # 3 epochs of 10 steps: too early to judge.
    check_stuck(5, 299, config)
    with pytest.raises(TrainingStuck, match="stopped at step 300 after 3 epochs at chance"):
        check_stuck(3, 300, config)
    check_stuck(9, 10_000, Config(stuck_steps=0))  # 0: never.


@pytest.mark.slow
def test_a_run_forced_to_chance_is_called_stuck_and_stopped(tmp_path):
    result = run_trainer(tmp_path, "--learning_rate=1e-9", "--epochs=5", "--steps_per_epoch=2", "--stuck_steps=6")
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning: training loss")]
    assert len(warnings) == 2, result.stdout[-2000:]  # After epochs 2 and 3; epoch 1 is forgiven.
    # Not a terminal: plain progress lines, one per loop of steps, no control codes.
    assert "\x1b" not in result.stdout and "\r" not in result.stdout and "\b" not in result.stdout
    assert "epoch 1/5: 2 steps of 8 images" in result.stdout
    assert re.search(r"^epoch 3/5 step 2/2: loss [\d.]+ top1_err [\d.]+ top5_err [\d.]+ img/s [\d.]+$",
                     result.stdout, re.M), result.stdout
    assert "for 2 epochs: the net is not learning. Try --init=caffe" in warnings[0]
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == \
        "error: stopped at step 6 after 3 epochs at chance; see the warning above (--stuck_steps=0 never stops)"


@pytest.mark.parametrize("changes, message", [({"batch_size": 0}, "--batch_size must be positive"),
                                              ({"momentum": 1.5}, "--momentum must be in [0, 1)"),
                                              ({"dropout_rate": 1.0}, "--dropout_rate must be in [0, 1)"),
                                              ({"towers_per_replica": 3}, "--towers_per_replica must be 1 or 2"),
                                              ({"eval_steps": -1}, "--eval_steps must be positive"),
                                              ({"stats": "/nonexistent.npz"}, "does not exist"),
                                              ({"preemption_exit_code": 256},
                                               "--preemption_exit_code must be in [0, 255], got 256"),
                                              ({"cluster_port": 0}, "--cluster_port must be positive"),
                                              ({"deterministic": True, "jit_compile": True},
                                               "--deterministic with --jit_compile: XLA has no deterministic")])
def test_bad_values_are_named(changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Config(**changes).validate()


def test_bad_input_stops_with_one_line_and_no_traceback(tmp_path):
    result = run_program("train", "--dataset=/nonexistent/folder", f"--model_dir={tmp_path}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "error: dataset folder /nonexistent/folder does not exist"
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume(tmp_path, final_digest):
    """A run killed with SIGKILL resumes from its last checkpoint, completes and exports (--export_dir)."""
    args = [*FAST, *LONGER, f"--model_dir={tmp_path}", "--checkpoint_every=2"]
    process = subprocess.Popen([sys.executable, "-m", "keras_alexnet.train", *args],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not tf.train.latest_checkpoint(tmp_path / "checkpoints") and time.time() < deadline:
            time.sleep(0.1)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    saved = int(tf.train.latest_checkpoint(tmp_path / "checkpoints").rsplit("-", 1)[1])
    assert 2 <= saved < 40
    export_dir = tmp_path / "export"  # Not a fact of the run: a resumed run may add it.
    result = run_trainer(tmp_path, *LONGER, "--checkpoint_every=2", f"--export_dir={export_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {tmp_path}/checkpoints/ckpt-{saved} at step {saved}" in result.stdout
    assert final_digest(result.stdout)[1] == 40
    assert (export_dir / "40" / "saved_model.pb").is_file() and f"exported a SavedModel to {export_dir}/40" in result.stdout
    assert f"-m keras_alexnet.embed --saved_model={export_dir}/40 --dataset=synthetic" in result.stdout
    assert json.loads((tmp_path / "config.json").read_text())["model"]["num_classes"] == 10
    assert len((tmp_path / "labels.txt").read_text().splitlines()) == 10


@pytest.mark.slow
def test_sigterm_saves_and_resumed_deterministic_run_matches_uninterrupted(tmp_path, final_digest):
    args = [*LONGER, "--deterministic", "--seed=5", "--checkpoint_every=3"]
    whole = run_trainer(tmp_path / "whole", *args)
    assert whole.returncode == 0, whole.stderr[-3000:]
    process = subprocess.Popen([sys.executable, "-m", "keras_alexnet.train", *FAST, *args,
                                f"--model_dir={tmp_path / 'split'}"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not tf.train.latest_checkpoint(tmp_path / "split" / "checkpoints") and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err[-3000:]
    assert "SIGTERM: stopped at step" in out
    resumed = run_trainer(tmp_path / "split", *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert final_digest(resumed.stdout) == final_digest(whole.stdout)


# ----------------------------------------------------------------------------------------- run directories

def image_folder(root, classes, per_class=4, corrupt=False):
    """root/train/<class>/*.png and root/val/<class>/*.png, small noise images (or all corrupt)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i in range(per_class):
                path = root / split / name / f"{i}.png"
                if corrupt:
                    path.write_bytes(b"not an image")
                else:
                    keras.utils.save_img(path, rng.integers(0, 256, (40, 48, 3)).astype("uint8"))
    return str(root)


def tiny_run(model_dir, dataset=None, logical_cpus=None, **changes):
    """A run of the narrow net (unless `changes` give another `model`) in this process."""
    settings = {**dict(dataset=dataset, model_dir=str(model_dir), batch_size=4, epochs=1, steps_per_epoch=1,
                       eval_steps=1, shuffle_buffer=16, init="caffe", model=NARROW), **changes}
    strategy, plan = distribute.make_strategy(2, logical_cpus[:2])
    trainer.set_up_process(Config(**settings))
    return trainer.Trainer(Config(**settings), strategy, plan).fit()


@pytest.mark.slow
def test_a_run_directory_refuses_to_resume_as_something_else(tmp_path, logical_cpus):
    run = tmp_path / "run"
    tiny_run(run, image_folder(tmp_path / "abc", ["ant", "bee", "cat"]), logical_cpus)
    files = {name: (run / name).read_bytes() for name in ("config.json", "labels.txt")}
    dataset = str(tmp_path / "abc")
    with pytest.raises(ValueError, match=re.escape("was trained with --batch_size 4, not 8")):
        tiny_run(run, dataset, logical_cpus, batch_size=8)
    with pytest.raises(ValueError, match=re.escape(f"was trained with --dataset {dataset}, not ")):
        tiny_run(run, image_folder(tmp_path / "def", ["dog", "eel", "fox"]), logical_cpus)
    for split in ("train", "val"):  # The same folder, other classes: cat became cow, then dog joined.
        (tmp_path / "abc" / split / "cat").rename(tmp_path / "abc" / split / "cow")
    with pytest.raises(ValueError, match=re.escape("was trained on other classes than this dataset's (cat, cow)")):
        tiny_run(run, dataset, logical_cpus)
    for split in ("train", "val"):
        (tmp_path / "abc" / split / "cow").rename(tmp_path / "abc" / split / "cat")
    image_folder(tmp_path / "abc", ["dog"])
    with pytest.raises(ValueError, match=re.escape("other classes than this dataset's (dog)")):
        tiny_run(run, dataset, logical_cpus)
    assert {name: (run / name).read_bytes() for name in files} == files  # Never rewritten.
    assert int(tf.train.latest_checkpoint(run / "checkpoints").rsplit("-", 1)[1]) == 1


@pytest.mark.slow
def test_a_resume_refuses_flags_that_change_what_the_run_computes(tmp_path, logical_cpus):
    run = tmp_path / "run"
    tiny_run(run, "synthetic", logical_cpus)
    config = (run / "config.json").read_bytes()
    preprocess.Stats.imagenet().save(tmp_path / "other.npz")
    for key, old, new in [("stats", None, str(tmp_path / "other.npz")), ("weight_decay", 0.0005, 0.001),
                          ("momentum", 0.9, 0.5), ("dropout_rate", 0.5, 0.1), ("seed", 0, 3),
                          ("pca_lighting", True, False), ("init", "caffe", "paper"), ("decay_biases", False, True)]:
        with pytest.raises(ValueError, match=re.escape(f"was trained with --{key} {old}, not {new}: resume with")):
            tiny_run(run, "synthetic", logical_cpus, **{key: new})
    with pytest.raises(ValueError, match=re.escape("was trained with network {'")):
        tiny_run(run, "synthetic", logical_cpus, model={"width": 1 / 8})
    assert (run / "config.json").read_bytes() == config


@pytest.mark.slow
def test_a_resume_applies_epochs_learning_rate_and_checkpoint_every_and_records_them(tmp_path, logical_cpus):
    """The resumed epoch trains at the new rate (history.jsonl), and config.json says from which step."""
    run = tmp_path / "run"
    tiny_run(run, "synthetic", logical_cpus, learning_rate=0.01)
    tiny_run(run, "synthetic", logical_cpus, epochs=2, learning_rate=0.002, checkpoint_every=7)
    config = json.loads((run / "config.json").read_text())
    assert (config["epochs"], config["learning_rate"], config["checkpoint_every"]) == (2, 0.002, 7)
    assert config["changes"] == [{"step": 1, "flag": "epochs", "was": 1, "now": 2},
                                 {"step": 1, "flag": "learning_rate", "was": 0.01, "now": 0.002},
                                 {"step": 1, "flag": "checkpoint_every", "was": 500, "now": 7}]
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [(h["epoch"], h["learning_rate"]) for h in history] == [(1, pytest.approx(0.01)), (2, pytest.approx(0.002))]


@pytest.mark.parametrize("classes, corrupt, batch_size, message", [
    (["ant", "bee"], True, 4, "no training image could be read (all 8 files are corrupt"),
    (["ant"], False, 4, "has 1 class: a classifier needs 2 or more"),
    (["ant", "bee"], False, 16, "has 8 training images, fewer than one batch of 16"),
])
def test_data_that_cannot_train_is_refused_before_anything_is_written(tmp_path, logical_cpus, classes, corrupt,
                                                                      batch_size, message):
    dataset = image_folder(tmp_path / "data", classes, corrupt=corrupt)
    with pytest.raises(ValueError, match=re.escape(message)):
        tiny_run(tmp_path / "run", dataset, logical_cpus, batch_size=batch_size)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------- learning rate

def plateau_state():
    """The loop state train() checkpoints, at its start values."""
    return {name: tf.Variable(value, trainable=False, name=name) for name, value in
            [("step", tf.constant(0, tf.int64)), ("epoch", tf.constant(0, tf.int64)), ("best_error", 1.0),
             ("bad_epochs", 0), ("lr_drops", 0), ("stuck_epochs", 0)]}


def test_plateau_rule_divides_by_10_after_patience_up_to_the_limit():
    """Section 5: lr /= 10 after --lr_patience epochs without a lower validation error, at most
    --max_lr_drops times; an equal error is no improvement."""
    state, base_lr = plateau_state(), tf.Variable(0.01)
    config = Config(lr_patience=2, max_lr_drops=2)
    # validation error, then (learning rate, best error, bad epochs, drops) after the epoch
    epochs = [(0.9, 1e-2, 0.9, 0, 0), (0.8, 1e-2, 0.8, 0, 0), (0.85, 1e-2, 0.8, 1, 0), (0.8, 1e-3, 0.8, 0, 1),
              (0.7, 1e-3, 0.7, 0, 1), (0.75, 1e-3, 0.7, 1, 1), (0.75, 1e-4, 0.7, 0, 2),
              (0.75, 1e-4, 0.7, 1, 2), (0.75, 1e-4, 0.7, 2, 2), (0.75, 1e-4, 0.7, 3, 2), (0.6, 1e-4, 0.6, 0, 2)]
    for error, lr, best, bad, drops in epochs:
        before = float(base_lr.numpy())
        dropped = update_learning_rate(state, base_lr, error, config)
        got = (float(base_lr.numpy()), float(state["best_error"].numpy()), int(state["bad_epochs"].numpy()),
               int(state["lr_drops"].numpy()))
        assert got == pytest.approx((lr, best, bad, drops)) and dropped == (got[0] < before), error


def test_warmup_ramps_linearly_then_follows_base_lr():
    """The schedule the optimizer sees: lr * (step + 1) / warmup over the warm-up, then base_lr,
    whose drops by the plateau rule show through; checked by the SGD updates it makes."""
    base_lr = tf.Variable(0.01, trainable=False)
    schedule = WarmupThenPlateau(base_lr, 4)
    assert [float(schedule(step)) for step in range(6)] == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])
    assert schedule.get_config() == {"warmup_steps": 4}
    weight = tf.Variable([0.0])
    optimizer = keras.optimizers.SGD(schedule, momentum=0.0)
    updates = []
    for step in range(7):
        if step == 5:
            base_lr.assign(base_lr / 10)  # As update_learning_rate does after an epoch.
        before = weight.numpy()[0]
        optimizer.apply_gradients([(tf.constant([1.0]), weight)])
        updates.append(before - weight.numpy()[0])
    assert updates == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.001, 0.001], rel=1e-5)
    no_warmup = WarmupThenPlateau(base_lr, 0)
    base_lr.assign(0.5)
    assert float(no_warmup(0)) == float(no_warmup(1000)) == 0.5


@pytest.mark.parametrize("values", ["3M_normal", "a_bias_0.1_plus_1e-8"])
def test_epoch_histograms_are_numpys_exact_counts(tmp_path, values):
    """summaries.histogram, chunk by chunk, writes what numpy counts in one piece, even over a range
    float32 cannot cut into 30 buckets (a bias after a few small steps)."""
    values = (np.random.default_rng(0).normal(size=3_000_000).astype(np.float32) if values == "3M_normal"
              else np.float32(0.1) + np.arange(7, dtype=np.float32) * np.float32(7.5e-9))
    with tf.summary.create_file_writer(str(tmp_path)).as_default():
        assert summaries.histogram("w", values, step=1)
    events = [tf.compat.v1.Event.FromString(record.numpy())
              for record in tf.data.TFRecordDataset([str(path) for path in tmp_path.iterdir()])]
    [value] = [value for event in events for value in event.summary.value]
    buckets = tf.make_ndarray(value.tensor)
    counts, edges = np.histogram(values.astype(np.float64), summaries.HISTOGRAM_BINS)
    np.testing.assert_array_equal(buckets[:, 2], counts)
    np.testing.assert_allclose(buckets[:, 0], edges[:-1], rtol=1e-12)
    assert value.metadata.plugin_data.plugin_name == "histograms"


@pytest.mark.slow
def test_a_resumed_run_keeps_the_plateau_state(tmp_path, logical_cpus, monkeypatch):
    """best_error, bad_epochs, lr_drops and base_lr are in the checkpoint: a resumed run goes on from them."""
    update, seen = trainer.update_learning_rate, []

    def force(state, base_lr, val_error, config):  # Run 1: leave values no fresh run starts with.
        update(state, base_lr, val_error, config)
        state["best_error"].assign(0.0)  # No error is lower: the next epoch is a bad one.
        state["bad_epochs"].assign(1)
        state["lr_drops"].assign(2)
        base_lr.assign(0.0042)

    def record(state, base_lr, val_error, config):  # Run 2: what it resumed with.
        seen.append({"base_lr": float(base_lr.numpy()), "step": int(state["step"].numpy()),
                     **{k: float(state[k].numpy()) for k in ("best_error", "bad_epochs", "lr_drops")}})
        update(state, base_lr, val_error, config)

    monkeypatch.setattr(trainer, "update_learning_rate", force)
    tiny_run(tmp_path, "synthetic", logical_cpus, epochs=1)
    monkeypatch.setattr(trainer, "update_learning_rate", record)
    tiny_run(tmp_path, "synthetic", logical_cpus, epochs=2)
    assert seen == [{"base_lr": pytest.approx(0.0042), "step": 2, "best_error": 0.0, "bad_epochs": 1,
                     "lr_drops": 2}]
    # Its second bad epoch reaches the patience of 2: the third drop, saved at the epoch's end.
    saved = tf.train.load_checkpoint(tf.train.latest_checkpoint(tmp_path / "checkpoints"))
    value = {name: saved.get_tensor(f"{name}/.ATTRIBUTES/VARIABLE_VALUE")
             for name in ("base_lr", "best_error", "bad_epochs", "lr_drops", "step")}
    assert value == {"base_lr": pytest.approx(0.00042), "best_error": 0.0, "bad_epochs": 0, "lr_drops": 3, "step": 2}


@pytest.mark.slow
def test_a_run_stopped_after_an_epochs_last_step_resumes_with_that_epochs_totals(tmp_path, logical_cpus,
                                                                                   monkeypatch):
    """A checkpoint taken after the last step but before the epoch's end (SIGTERM there, or --checkpoint_every)
    resumes into an empty rest of the epoch: its training metrics come from the checkpointed totals."""
    def killed(self, summed):
        raise KeyboardInterrupt("stopped between the last step and the epoch's end")

    with monkeypatch.context() as patch:
        patch.setattr(trainer.Trainer, "end_epoch", killed)
        with pytest.raises(KeyboardInterrupt):
            tiny_run(tmp_path, "synthetic", logical_cpus, steps_per_epoch=2, checkpoint_every=2)
    assert int(tf.train.latest_checkpoint(tmp_path / "checkpoints").rsplit("-", 1)[1]) == 2
    tiny_run(tmp_path, "synthetic", logical_cpus, steps_per_epoch=2, checkpoint_every=2)
    history = [json.loads(line) for line in (tmp_path / checkpoint.HISTORY).read_text().splitlines()]
    assert [(h["epoch"], h["step"], h["train"]["images"]) for h in history] == [(1, 2, 8)]


def test_the_init_flag_offers_exactly_the_models_schemes():
    """config.py lists the choices itself (it imports nothing downstream): they must be model.INITS's."""
    field = next(f for f in dataclasses.fields(Config) if f.name == "init")
    assert field.metadata["choices"] == list(model.INITS)


def test_a_checkpoint_of_an_older_version_is_refused_in_one_line(tmp_path):
    """A run directory of a version that kept no epoch_totals cannot resume exactly: one line says so."""
    old = tf.train.Checkpoint(step=tf.Variable(3, dtype=tf.int64))
    path = old.save(str(tmp_path / "ckpt"))
    new = tf.train.Checkpoint(step=tf.Variable(0, dtype=tf.int64), epoch_totals=tf.Variable(tf.zeros(4), name="epoch_totals"))
    with pytest.raises(ValueError, match=r"written by another version of keras_alexnet: it lacks epoch_totals;"):
        checkpoint.restore_training(new, path)
    checkpoint.restore_training(tf.train.Checkpoint(step=tf.Variable(0, dtype=tf.int64)), path)  # All there: fine.

"""Data parallelism is the same computation: device plans, workers, loops of steps and preemption; each
tower's weights on its device; GPU plans of faked device lists, and the GPU settings a run makes.

Every run here is batch 8, dropout 0, seed 1, --deterministic; most are 2 epochs of 3 steps. The
device plans ((a) 1 replica x 2 towers, (b) 2 replicas x 2 towers, (c) 2 replicas x 1 tower,
(d) 2 workers of 1 replica x 2 towers) must end with the same weights and optimizer slots, up to the
summation order of the replicas' gradients. Every plan trains the narrow net (--width=0.0625, conftest.NARROW:
every layer at 1/16 of the paper's units): the distribution is the point, not the size of the net.
"""
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.distribute.failure_handling import failure_handling_util  # To force the platform.
from tensorflow.python.framework import config as tf_config  # disable_op_determinism: no public API.

from conftest import NARROW
from keras_alexnet import checkpoint, data, distribute, preprocess, sources, trainer
from keras_alexnet.config import Config
from keras_alexnet.errors import UserError
from keras_alexnet.model import build_alexnet, feature_model, tower_variables
from keras_alexnet.optimizer import LossScaleOptimizer, PaperSGD
from keras_alexnet.step import make_replica_step, make_train_loop, make_train_step

# Learning rate 0.0001: ReLUs amplify rounding. A gradient summed in another order differs by ~1e-7,
# so do the next weights, and where that moves a pre-activation across 0 one unit's gradient passes
# or stops: a whole row of fc6's slot can change. The weights move by lr times that; at 0.001 one
# such flip between plans a and d moved fc6's bias by 2e-5 of the layer's weight scale, over the
# plans' bound of 1e-5. This measures the distribution, not the dynamics of a random net.
RUN = dict(dataset="synthetic", batch_size=8, epochs=2, steps_per_epoch=3, eval_steps=1, dropout_rate=0.0,
           seed=1, deterministic=True, shuffle_buffer=64, init="caffe", learning_rate=0.0001, **NARROW)
FLAGS = [f"--{key}={value}" for key, value in RUN.items()]


def run_in_process(model_dir, devices, towers_per_replica, **changes):
    strategy, plan = distribute.make_strategy(towers_per_replica, devices)
    config = Config(**RUN, model_dir=str(model_dir), towers_per_replica=towers_per_replica, **changes)
    trainer.set_up_process(config)
    trainer.Trainer(config, strategy, plan).fit()
    return final_checkpoint(model_dir)


def final_checkpoint(model_dir):
    """{key: array} of the optimizer's variables in a run's latest checkpoint: the iteration count, the
    weights (optimizer/_trainable_variables/i) and their momentum slots (optimizer/_variables/i+1).
    The names are the paths TensorFlow's checkpoint takes to them; a Keras that renames them fails
    assert_same_computation's count."""
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(os.path.join(model_dir, checkpoint.CHECKPOINTS)))
    return {key: reader.get_tensor(key) for key in reader.get_variable_to_shape_map() if key.startswith("optimizer/")}


def assert_same_computation(got, want):
    """The plans' bound: each weight and momentum slot within 1e-5 of the weight scale (max
    |kernel| of its layer; a slot is a step in weight units, w <- w + v). Not a slot's own size: over
    several steps a ReLU that flips on a rounding difference changes a whole row of a slot (BUILD.md,
    "Device plans"); test_one_step_of_two_replicas_is_one_replicas_step holds one step to that.
    """
    assert got.keys() == want.keys() and len(want) == 61
    for i in range(30):
        scale = np.abs(want[_key("_trainable_variables", i - i % 2)]).max()  # Keras lists kernel, then bias.
        for key in _key("_trainable_variables", i), _key("_variables", i + 1):
            assert np.abs(got[key] - want[key]).max() <= 1e-5 * scale, key
    assert got[_key("_iterations")] == want[_key("_iterations")]


def _key(*path):
    return "/".join(["optimizer", *map(str, path), ".ATTRIBUTES/VARIABLE_VALUE"])


@pytest.fixture(scope="module")
def plan_a(tmp_path_factory, logical_cpus):
    """(a) 1 replica x 2 towers, 4 steps a loop (an epoch of 3 in one); the reference of the other plans."""
    model_dir = tmp_path_factory.mktemp("plan_a")
    return run_in_process(model_dir, logical_cpus[:2], 2, steps_per_loop=4), model_dir


def test_plan_a_trains_exact_epochs_and_writes_them(plan_a):
    weights, model_dir = plan_a
    history = [json.loads(line) for line in (model_dir / checkpoint.HISTORY).read_text().splitlines()]
    assert [(h["epoch"], h["step"], h["train"]["images"], h["validation"]["images"]) for h in history] == \
        [(1, 3, 24, 8), (2, 6, 24, 8)]
    assert len(weights) == 61  # 30 weights, their 30 momentum slots, the iteration count.


@pytest.mark.slow
def test_one_step_a_loop_is_bit_identical_to_four(plan_a, tmp_path, logical_cpus):
    weights = run_in_process(tmp_path, logical_cpus[:2], 2, steps_per_loop=1)
    for key in plan_a[0]:
        np.testing.assert_array_equal(weights[key], plan_a[0][key], err_msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("towers", [2, 1], ids=["b_2_replicas_x_2_towers", "c_2_replicas_x_1_tower"])
def test_two_replicas_compute_what_one_does(plan_a, tmp_path, logical_cpus, towers):
    devices = logical_cpus if towers == 2 else logical_cpus[:2]
    weights = run_in_process(tmp_path, devices, towers, steps_per_loop=2)  # Loops of 2 and 1 steps.
    history = [json.loads(line) for line in (tmp_path / checkpoint.HISTORY).read_text().splitlines()]
    assert [h["step"] for h in history] == [3, 6]  # Exact epochs with 2 replicas: 3 global steps each, as with one.
    assert_same_computation(weights, plan_a[0])


def model_and_sgd(strategy, plan, config, num_classes=10, init="paper", seed=3, loss_scale=False, width=1.0):
    """AlexNet without dropout and PaperSGD, built in `strategy`'s scope as the trainer builds them
    (loss_scale: wrapped in our LossScaleOptimizer, as for mixed_float16)."""
    with tower_variables(), strategy.scope():
        model = build_alexnet(num_classes, tower_devices=plan, dropout_rate=0.0, init=init, seed=seed, width=width)
        optimizer = PaperSGD(config.learning_rate, momentum=config.momentum, weight_decay=config.weight_decay,
                             decay_biases=config.decay_biases)
        if loss_scale:
            optimizer = LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)
    return model, optimizer


def one_step(devices, towers_per_replica, images, labels):
    """The momentum slots after one training step on the global batch (images, labels): from zero, a
    slot is then the step itself, w1 - w0 = -lr (dL/dw + decay w)."""
    config = Config(**RUN)
    strategy, plan = distribute.make_strategy(towers_per_replica, devices)
    model, optimizer = model_and_sgd(strategy, plan, config, init=config.init, seed=config.seed, width=config.width)
    batches = tf.data.Dataset.from_tensor_slices((images, labels)).batch(config.batch_size)
    make_train_step(strategy, model, optimizer, config)(*next(iter(strategy.experimental_distribute_dataset(batches))))
    return [m.numpy() for m in optimizer.momentums]


def test_one_step_of_two_replicas_is_one_replicas_step(logical_cpus):
    """From the same weights one step has nothing to amplify a summation order: (b) and (c) take every
    step of (a) to 1e-5 of its own size (seen with the paper's net: 2e-6; with weight decay counted once
    per replica, 2e-2). The narrow net's layers are small: this process keeps them."""
    images, labels = tf.random.stateless_normal([8, 227, 227, 3], [0, 4], stddev=50), tf.range(8)
    plans = {"a": (logical_cpus[:2], 2), "b": (logical_cpus, 2), "c": (logical_cpus[:2], 1)}
    steps = {f"{plan}{i}": step for plan, (devices, towers) in plans.items()
             for i, step in enumerate(one_step(devices, towers, images, labels))}
    for plan in "bc":
        errors = [np.abs(steps[f"{plan}{i}"] - steps[f"a{i}"]).max() / np.abs(steps[f"a{i}"]).max() for i in range(30)]
        assert max(errors) <= 1e-5, (plan, errors)


def index(device):
    return tf.DeviceSpec.from_string(device).device_index


def placed_strategy(plan_name, logical_cpus):
    """(strategy, plan) of plan (a), (b), (c), or one worker of (d) in this process: MultiWorkerMirroredStrategy
    without TF_CONFIG, as a worker of (d) runs it (one replica on CPU:0, towers on CPU:0 and CPU:1)."""
    if plan_name == "d":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        return strategy, {strategy.extended.worker_devices[0]: logical_cpus[:2]}
    devices, towers = {"a": (logical_cpus[:2], 2), "b": (logical_cpus, 2), "c": (logical_cpus[:2], 1)}[plan_name]
    return distribute.make_strategy(towers, devices)


def bytes_per_device(variables):
    """{device index: bytes} of every replica's copy of `variables`."""
    sizes = {}
    for variable in variables:
        for copy in variable.value.values:
            sizes[index(copy.device)] = sizes.get(index(copy.device), 0) + copy.numpy().nbytes
    return sizes


@pytest.mark.parametrize("plan_name", "abcd")
def test_each_towers_weights_and_momentum_live_on_its_device(logical_cpus, plan_name):
    """Section 3.2: each device holds its tower's half of the kernels. Every replica's copy of a *_b weight
    and of its momentum slot is on that replica's tower B device; *_a and fc8 on tower A's."""
    strategy, plan = placed_strategy(plan_name, logical_cpus)
    model, optimizer = model_and_sgd(strategy, plan, Config(**RUN), width=RUN["width"])
    pairs = {index(replica): pair for replica, pair in plan.items()}
    assert len(model.trainable_variables) == len(optimizer.momentums) == 30
    for variable, slot in zip(model.trainable_variables, optimizer.momentums):
        tower = 1 if variable.path.split("/")[0].endswith("_b") else 0
        want = [index(pairs[index(replica)][tower]) for replica in strategy.extended.worker_devices]
        for copies in variable.value.values, slot.value.values:
            assert [index(copy.device) for copy in copies] == want, (variable.path, plan_name)
    towers_b = {index(b) for _, b in plan.values()} - {index(a) for a, _ in plan.values()}
    assert len(towers_b) == (0 if plan_name == "c" else len(plan))  # Devices of tower B alone, but in (c).


def test_the_papers_net_splits_its_bytes_between_the_towers_devices(logical_cpus):
    """Plan (a) with the paper's net: tower B's device holds its 28,434,112 weights and their momentum
    (227,472,896 bytes in float32), tower A's the other 28,434,112 and fc8's 4,097,000 (260,248,896 bytes)."""
    strategy, plan = placed_strategy("a", logical_cpus)
    model, optimizer = model_and_sgd(strategy, plan, Config(**RUN), num_classes=1000)
    assert model.count_params() == 60_965_224
    tower_a, tower_b = (index(device) for device in plan[next(iter(plan))])
    assert bytes_per_device(model.trainable_variables + optimizer.momentums) == \
        {tower_a: 2 * 4 * (28_434_112 + 4_097_000), tower_b: 2 * 4 * 28_434_112}


XLA = {**RUN, "deterministic": False, "jit_compile": True}  # XLA has no deterministic max-pooling gradient.


def test_xla_is_refused_for_two_towers_on_two_devices(tmp_path, logical_cpus):
    """XLA ignores tf.device (tensorflow/tensorflow#124880): in plan (a) it would run both towers on one
    device, so the trainer refuses it before writing anything."""
    config = Config(**XLA, model_dir=str(tmp_path / "run"))
    trainer.set_up_process(config)
    with pytest.raises(UserError, match=r"^--jit_compile with two towers on two devices: .*--towers_per_replica=1"):
        trainer.Trainer(config, *distribute.make_strategy(2, logical_cpus[:2]))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_xla_runs_replicas_of_one_device(logical_cpus):
    """Plan (c): a replica is one device, and its XLA step compiles and runs (op determinism off for it)."""
    config = Config(**XLA)
    strategy, plan = distribute.make_strategy(1, logical_cpus[:2])
    model, optimizer = model_and_sgd(strategy, plan, config, width=RUN["width"])
    batches = tf.data.Dataset.from_tensor_slices((tf.random.stateless_normal([8, 227, 227, 3], [0, 8], stddev=50),
                                                  tf.range(8))).batch(8)
    determinism = tf_config.is_op_determinism_enabled()  # On after any run here: process-wide.
    tf_config.disable_op_determinism()
    try:
        totals = make_train_step(strategy, model, optimizer, config)(
            *next(iter(strategy.experimental_distribute_dataset(batches))))
    finally:
        if determinism:
            tf.config.experimental.enable_op_determinism()
    assert float(totals[3]) == 8 and np.isfinite(float(totals[0]))  # 8 images, a finite loss.


@pytest.mark.slow
def test_a_loop_sums_its_totals_over_the_replicas_once(logical_cpus, monkeypatch):
    """Each replica keeps its totals across the loop's steps; the one reduction (across workers, a collective
    between hosts) is traced outside the loop's body, not in every step."""
    config = Config(**RUN)
    strategy, plan = distribute.make_strategy(2, logical_cpus)  # (b): 2 replicas.
    model, optimizer = model_and_sgd(strategy, plan, config, width=RUN["width"])
    graphs, reduce = [], strategy.reduce

    def traced_reduce(*args, **kwargs):
        graph, names = tf.compat.v1.get_default_graph(), []
        while graph is not None:
            names.append(getattr(graph, "name", "the outermost graph"))
            graph = getattr(graph, "outer_graph", None)
        graphs.append(names)
        return reduce(*args, **kwargs)

    monkeypatch.setattr(strategy, "reduce", traced_reduce)
    loop = make_train_loop(strategy, make_replica_step(model, optimizer, config), tf.Variable(0, dtype=tf.int64))
    batches = tf.data.Dataset.from_tensor_slices((tf.random.stateless_normal([8, 227, 227, 3], [0, 9], stddev=50),
                                                  tf.range(8))).batch(8).repeat()
    totals = loop(iter(strategy.experimental_distribute_dataset(batches)), tf.constant(3))
    assert len(graphs) == 1 and not any("while" in name for name in graphs[0]), graphs
    assert float(totals[3]) == 3 * 8  # Every image of the 3 steps, counted once.


@pytest.mark.slow
def test_uint8_batches_made_float_on_the_replicas_train_as_the_float_pipeline(logical_cpus):
    """The trainer's input: uint8 crops to each replica's device, made float32 there (data.network_input).
    Three steps of plan (b) on them end with the weights of three steps on the float pipeline's batches,
    bit for bit (the same float32 sums, on another device)."""
    config = Config(**RUN)
    source, stats = sources.load_source("synthetic", "train"), preprocess.Stats.imagenet()
    stats.mean_image = np.random.default_rng(5).uniform(0, 255, stats.mean_image.shape).astype(np.float32)
    weights = {}
    for to_float in (True, False):
        strategy, plan = distribute.make_strategy(2, logical_cpus)
        model, optimizer = model_and_sgd(strategy, plan, config, init=config.init, seed=config.seed, width=config.width)
        initial = model.trainable_variables[0].numpy()
        loop = make_train_loop(strategy, make_replica_step(model, optimizer, config), tf.Variable(0, dtype=tf.int64),
                               None if to_float else data.float_images(stats, strategy))  # As the trainer's.
        batches = strategy.distribute_datasets_from_function(lambda context: data.train_pipeline(
            source, config.batch_size, stats, seed=2, steps=3, input_context=context, to_float=to_float))
        loop(iter(batches), tf.constant(3))
        weights[to_float] = [v.numpy() for v in model.trainable_variables]
    for got, want in zip(weights[False], weights[True], strict=True):
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(weights[False][0], initial)  # The steps moved the weights.


# ----------------------------------------------------------------------------------------- workers

def tf_config_cluster(ports, index):
    return {"TF_CONFIG": json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                                     "task": {"type": "worker", "index": index}})}


def start_workers(model_dir, ports, *extra, cluster=tf_config_cluster):
    """Two worker processes, told their cluster by `cluster(ports, index)`'s variables; their output goes to
    files beside the run (a full pipe would block one)."""
    workers = []
    for index in range(2):
        env = {**os.environ, **cluster(ports, index)}
        worker = subprocess.Popen(
            [sys.executable, "-m", "keras_alexnet.train", *FLAGS, "--cpu_devices=2", f"--model_dir={model_dir}",
             *extra], env=env, stdout=open(f"{model_dir}.worker{index}.out", "w"),
            stderr=open(f"{model_dir}.worker{index}.err", "w"))
        worker.log = f"{model_dir}.worker{index}"
        workers.append(worker)
    return workers


def output(worker, stream="out"):
    return Path(f"{worker.log}.{stream}").read_text()


def finish(workers, timeout=400):
    """The workers' standard outputs, once both have exited with status 0."""
    for worker in workers:
        worker.wait(timeout=timeout)
        assert worker.returncode == 0, (output(worker)[-2000:], output(worker, "err")[-3000:])
    return [output(worker) for worker in workers]


@pytest.fixture(scope="module")
def plan_d(tmp_path_factory, free_port):
    """(d) 2 workers (TF_CONFIG on 127.0.0.1), each 1 replica x 2 towers on 2 logical CPUs."""
    model_dir = tmp_path_factory.mktemp("plan_d")
    outputs = finish(start_workers(model_dir, [free_port(), free_port()], "--steps_per_loop=1"))
    return outputs, model_dir


def assert_workers_agree(outputs, final_digest):
    """Both workers printed one final digest, at step 6: their mirrored weights ended bit-identical."""
    digests = [final_digest(out) for out in outputs]
    assert digests[0] == digests[1] and digests[0][1] == 6, digests


@pytest.mark.slow
def test_two_workers_compute_what_one_replica_does(plan_a, plan_d, final_digest):
    outputs, model_dir = plan_d
    assert_workers_agree(outputs, final_digest)
    assert not list(model_dir.glob(".worker*"))
    assert_same_computation(final_checkpoint(model_dir), plan_a[0])


def slurm_step(ports, index):
    """What srun sets for task `index` of a step of 2 tasks on one node, localhost (the resolver reads these)."""
    return {"SLURM_PROCID": str(index), "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "localhost",
            "SLURM_STEP_TASKS_PER_NODE": "2"}


@pytest.mark.slow
def test_two_slurm_tasks_compute_what_one_replica_does(plan_a, tmp_path, free_port, final_digest):
    """--cluster=slurm: SlurmClusterResolver makes the 2 tasks of a step on one CPU node the workers of plan (d),
    on ports P and P + 1 (no nvidia-smi, which this machine lacks)."""
    port = free_port()
    while not port_is_free(port + 1):
        port = free_port()
    workers = start_workers(tmp_path / "run", [], "--steps_per_loop=1", "--cluster=slurm", f"--cluster_port={port}",
                            cluster=slurm_step)
    assert_workers_agree(finish(workers), final_digest)
    assert_same_computation(final_checkpoint(tmp_path / "run"), plan_a[0])


@pytest.mark.parametrize("devices", [["/device:CPU:0", "/device:CPU:1"], [f"/device:GPU:{i}" for i in range(4)]],
                         ids=["cpu_node", "4_gpus_a_task"])
def test_the_slurm_resolver_runs_no_nvidia_smi_and_leaves_the_gpus_alone(monkeypatch, devices):
    """Task 2 of a step of 3 tasks on 2 nodes: the cluster, task k of a node on port + k, without nvidia-smi
    and without setting CUDA_VISIBLE_DEVICES (unset here)."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(subprocess, "check_output", lambda *args, **kwargs: pytest.fail("ran nvidia-smi"))
    for name, value in zip(distribute.SLURM_VARIABLES, ["2", "3", "node[1-2]", "2,1"]):
        monkeypatch.setenv(name, value)
    resolver = distribute.cluster_resolver("slurm", devices, 9000)
    assert resolver.cluster_spec().as_dict() == {"worker": ["node1:9000", "node1:9001", "node2:9000"]}
    assert (resolver.task_type, resolver.task_id) == ("worker", 2) and "CUDA_VISIBLE_DEVICES" not in os.environ


def test_slurm_outside_a_slurm_step_is_one_line(monkeypatch):
    monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
    monkeypatch.setenv("SLURM_PROCID", "0")
    with pytest.raises(UserError, match=r"^--cluster=slurm: SLURM_STEP_NUM_TASKS(, SLURM_\w+)* not set: start train "
                                        r"with srun$"):
        distribute.cluster_resolver("slurm", ["/device:CPU:0"], 8888)


def test_the_launch_examples_restart_on_the_preemption_exit_code():
    """docs/tfjob.yaml restarts a pod on 128-255 (Kubeflow's ExitCode) and docs/slurm.sbatch requeues itself on
    the status train then exits with after SIGTERM's checkpoint; every flag they give train is one of its own."""
    docs = Path(__file__).resolve().parents[1] / "docs"
    tfjob, sbatch = ((docs / name).read_text() for name in ("tfjob.yaml", "slurm.sbatch"))
    assert re.search(r"^ +restartPolicy: ExitCode$", tfjob, re.M)
    for text in tfjob, sbatch:
        commands = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        code = int(re.search(r"--preemption_exit_code=(\d+)", commands).group(1))
        assert 128 <= code <= 255, code
        assert set(re.findall(r"--(\w+)=", commands)) <= {field.name for field in dataclasses.fields(Config)}
    assert f'if [ "$status" -eq {code} ]; then' in sbatch


def port_is_free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@pytest.mark.slow
def test_sigterm_to_one_worker_saves_both_and_resumes(plan_d, tmp_path, free_port, final_digest):
    """TensorFlow's PreemptionCheckpointHandler: both workers save at one step and exit 0; started
    again, they end with the uninterrupted run's weights and slots."""
    workers = start_workers(tmp_path, [free_port(), free_port()], "--steps_per_loop=1")
    deadline = time.time() + 300
    while "epoch 1/2 step 1/3" not in output(workers[1]):  # Training has begun: TF's handler is installed.
        assert time.time() < deadline and workers[1].poll() is None, output(workers[1])
        time.sleep(0.2)
    workers[1].send_signal(signal.SIGTERM)
    outputs = finish(workers)
    stopped = [int(out.split("SIGTERM: stopped at step ")[1].split(";")[0]) for out in outputs
               if "SIGTERM: stopped at step" in out]
    assert len(stopped) == 2 and stopped[0] == stopped[1] < 6, outputs
    assert int(tf.train.latest_checkpoint(tmp_path / "checkpoints").rsplit("-", 1)[1]) == stopped[0]
    resumed = finish(start_workers(tmp_path, [free_port(), free_port()], "--steps_per_loop=1"))
    assert_workers_agree(resumed, final_digest)
    # Bit-identical to plan (d) in every run alone; within a full suite, 3 of ~9 runs of (d) or of this
    # test ended a rounding away (one conv1 slot off by 1e-7 of itself). BUILD.md, "Two workers".
    assert_same_computation(final_checkpoint(tmp_path), final_checkpoint(plan_d[1]))


@pytest.mark.slow
def test_sigterm_on_a_gcp_gpu_vm_saves_and_stops(tmp_path, logical_cpus, monkeypatch, capsys):
    """TensorFlow's handler, finding a GCP GPU VM, polls the maintenance events and leaves SIGTERM alone (the
    signal would end the run unsaved): it polls our SIGTERM flag instead, with no grace period. The run exits
    with --preemption_exit_code (143: what Kubeflow's restartPolicy ExitCode restarts, docs/cluster.md)."""
    monkeypatch.setattr(failure_handling_util, "detect_platform", lambda: failure_handling_util.PlatformDevice.GCE_GPU)
    config = Config(**RUN, model_dir=str(tmp_path), steps_per_loop=1, preemption_exit_code=143)
    trainer.set_up_process(config)
    run = trainer.Trainer(config, *distribute.make_strategy(2, logical_cpus[:2]))
    assert run.preemption._platform_device is failure_handling_util.PlatformDevice.GCE_GPU
    signal.raise_signal(signal.SIGTERM)
    time.sleep(1.5)  # The handler polls the flag each second.
    with pytest.raises(SystemExit) as stopped:
        run.fit()
    step = int(re.search(r"SIGTERM: stopped at step (\d+);", capsys.readouterr().out).group(1))
    assert stopped.value.code == 143 and step < 6  # The handler saves a loop after it learns of the signal.
    assert tf.train.latest_checkpoint(tmp_path / checkpoint.CHECKPOINTS).endswith(f"-{step}")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # The run's handler is gone with it.


def test_a_run_on_a_gcp_cpu_vm_ends_cleanly(tmp_path, logical_cpus, monkeypatch):
    """On a GCP CPU (or TPU) VM TensorFlow's handler starts no thread polling our SIGTERM flag: the run
    still trains, ends and puts SIGTERM's handler back."""
    monkeypatch.setattr(failure_handling_util, "detect_platform", lambda: failure_handling_util.PlatformDevice.GCE_CPU)
    config = Config(**{**RUN, "epochs": 1, "steps_per_epoch": 1}, model_dir=str(tmp_path))
    trainer.set_up_process(config)
    run = trainer.Trainer(config, *distribute.make_strategy(2, logical_cpus[:2]))
    assert getattr(run.preemption, "_poll_termination_signal_thread", None) is None
    run.fit()
    assert run.step == 1 and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# ----------------------------------------------------------------------------------------- GPU plans

def gpus(count):
    return [f"/device:GPU:{i}" for i in range(count)]


@pytest.mark.parametrize("multi_worker", [False, True], ids=["one_worker", "a_worker_of_several"])
@pytest.mark.parametrize("count, towers, want", [
    (1, 2, {0: (0, 0)}), (1, 1, {0: (0, 0)}),
    (2, 2, {0: (0, 1)}), (2, 1, {0: (0, 0), 1: (1, 1)}),
    (3, 1, {0: (0, 0), 1: (1, 1), 2: (2, 2)}),
    (4, 2, {0: (0, 2), 1: (1, 3)}), (4, 1, {i: (i, i) for i in range(4)}),
    (8, 2, {i: (i, 4 + i) for i in range(4)}), (8, 1, {i: (i, i) for i in range(8)})])
def test_gpu_plans_of_a_worker(count, towers, want, multi_worker):
    """k GPUs: k/2 replicas of two towers (tower B on GPU k/2 + i: MultiWorkerMirroredStrategy's replicas
    are a worker's first GPUs), or k replicas with --towers_per_replica=1; every GPU used once."""
    plan = distribute.device_plan(gpus(count), towers, multi_worker)
    assert {index(r): tuple(map(index, pair)) for r, pair in plan.items()} == want


def test_plans_no_strategy_can_give_are_refused(logical_cpus):
    with pytest.raises(UserError, match=r"^--towers_per_replica=2 pairs the 3 devices, and /device:GPU:2 would be "
                                        r"left unused: use CUDA_VISIBLE_DEVICES with an even number of GPUs"):
        distribute.device_plan(gpus(3), 2)
    for devices, towers in (logical_cpus, 2), (logical_cpus[:2], 1):  # A CPU worker of several: one replica.
        with pytest.raises(UserError, match="^under TF_CONFIG or --cluster=slurm a worker without GPUs runs one "
                                            "replica, not 2"):
            distribute.device_plan(devices, towers, multi_worker=True)
    assert distribute.device_plan(logical_cpus[:2], 2, multi_worker=True) == {logical_cpus[0]: logical_cpus[:2]}


FAKED_GPUS = """
import json, sys
import tensorflow as tf
from keras_alexnet import distribute
count, towers = int(sys.argv[1]), int(sys.argv[2])
cpus = tf.config.list_physical_devices
tf.config.list_physical_devices = lambda kind=None: [  # What a worker with `count` GPUs finds.
    tf.config.PhysicalDevice(f"/physical_device:GPU:{i}", "GPU") for i in range(count)] if kind == "GPU" else cpus(kind)
strategy, plan = distribute.make_strategy(towers)
print(json.dumps({"plan": distribute.describe(plan), "replicas": strategy.num_replicas_in_sync,
                  "implementation": strategy.extended._communication_options.implementation.name}))
"""


@pytest.mark.parametrize("count, towers", [(2, 2), pytest.param(4, 2, marks=pytest.mark.slow),
                                           pytest.param(8, 1, marks=pytest.mark.slow)])
def test_two_workers_on_faked_gpus_run_every_replica_over_nccl(count, towers, free_port, tmp_path):
    """Two worker processes under TF_CONFIG, each told it has `count` GPUs: each worker's plan (the line the
    trainer logs) names each of its replicas, the strategy runs that many, and the all-reduce asks for NCCL."""
    ports = [free_port(), free_port()]
    workers = [subprocess.Popen([sys.executable, "-c", FAKED_GPUS, str(count), str(towers)], text=True,
                                stdout=subprocess.PIPE, stderr=open(tmp_path / f"{index}.err", "w"), env={
        **os.environ, "TF_CONFIG": json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                                               "task": {"type": "worker", "index": index}})}) for index in range(2)]
    replicas = count // towers
    for task, worker in enumerate(workers):
        out, _ = worker.communicate(timeout=120)
        assert worker.returncode == 0, (tmp_path / f"{task}.err").read_text()[-3000:]
        got = json.loads(out.splitlines()[-1])
        assert got["plan"] == "; ".join(
            f"replica {i} on /job:worker/replica:0/task:{task}/device:GPU:{i} -> towers on /device:GPU:{i}, "
            f"/device:GPU:{i + replicas if towers == 2 else i}" for i in range(replicas))
        assert (got["replicas"], got["implementation"]) == (2 * replicas, "NCCL")


def test_the_suite_sees_no_gpu():
    """conftest hides the GPUs before TensorFlow is imported (and from every process a test starts)."""
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and not tf.config.list_physical_devices("GPU")


@pytest.mark.parametrize("capability, warned", [((7, 5), True), ((8, 0), False)])
def test_bfloat16_on_a_gpu_before_ampere_warns(policy, monkeypatch, capsys, capability, warned):
    cpus = tf.config.list_physical_devices
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [
        tf.config.PhysicalDevice("/physical_device:GPU:0", "GPU")] if kind == "GPU" else cpus(kind))
    monkeypatch.setattr(tf.config.experimental, "get_device_details", lambda gpu: {"compute_capability": capability})
    trainer.set_up_process(Config(mixed_precision="mixed_bfloat16"))
    out = capsys.readouterr().out
    assert ("warning: --mixed_precision=mixed_bfloat16 on /physical_device:GPU:0, of compute capability 7.5: "
            "bfloat16 needs 8.0 or newer" in out) == warned, out


def test_deterministic_runs_turn_tf32_off():
    """TF32 matmuls (on by default on Ampere and later) would break the plans' 1e-5 bounds there."""
    try:
        trainer.set_up_process(Config(deterministic=True))
        assert not tf.config.experimental.tensor_float_32_execution_enabled()
    finally:
        tf.config.experimental.enable_tensor_float_32_execution(True)


# ----------------------------------------------------------------------------------------- dropout

def fc6_masks(strategy, plan, images):
    """Each replica's fc6 dropout mask (tower A) for the same images."""
    with tower_variables(), strategy.scope():
        model = build_alexnet(10, tower_devices=plan, dropout_rate=0.5, seed=7, **NARROW)
    fc6 = feature_model(model, "dropout6_a")

    @tf.function
    def masks():
        return strategy.run(lambda: tf.cast(fc6(images, training=True) != 0, tf.int8))

    return [m.numpy() for m in strategy.experimental_local_results(masks())]


@pytest.mark.slow
def test_dropout_differs_between_replicas_and_repeats_with_the_seed(logical_cpus):
    strategy = distribute.mirrored_strategy(logical_cpus[:2])
    plan = {d: [d, d] for d in logical_cpus[:2]}
    images = tf.random.stateless_normal([2, 227, 227, 3], [0, 1], stddev=50)
    first = fc6_masks(strategy, plan, images)
    again = fc6_masks(strategy, plan, images)
    assert first[0].mean() > 0.2  # fc6 units are alive: a mask is visible.
    assert (first[0] != first[1]).mean() > 0.2  # Replicas drop different units ...
    for a, b in zip(first, again):  # ... and the seed repeats them.
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------------------- precision

@pytest.fixture
def policy():
    yield keras.mixed_precision.set_dtype_policy
    keras.mixed_precision.set_dtype_policy("float32")


def decay_only_step(policy_name, logical_cpus):
    """(w before, w after) of one step whose data gradient is exactly 0: fc8's bias makes the softmax
    one-hot on the label, so only weight decay moves the weights."""
    keras.mixed_precision.set_dtype_policy(policy_name)
    strategy = distribute.mirrored_strategy(logical_cpus[:1])
    config = Config(batch_size=2, dropout_rate=0.0, learning_rate=0.1, weight_decay=0.01, momentum=0.9)
    model, optimizer = model_and_sgd(strategy, {logical_cpus[0]: logical_cpus[:2]}, config,
                                     loss_scale=policy_name == "mixed_float16", **NARROW)
    model.get_layer("fc8").layer.bias.assign(np.eye(10)[0] * 1000)
    before = [v.numpy() for v in model.trainable_variables]
    step = make_train_step(strategy, model, optimizer, config)
    step(tf.random.stateless_normal([2, 227, 227, 3], [0, 2], stddev=50), tf.zeros([2], tf.int32))
    return before, [v.numpy() for v in model.trainable_variables], model.trainable_variables, optimizer


def test_mixed_float16_decays_unscaled_gradients_exactly_as_float32(policy, logical_cpus):
    before, after, variables, optimizer = decay_only_step("mixed_float16", logical_cpus)
    assert optimizer.dynamic_scale.numpy() == 2.0 ** 15  # The loss really was scaled.
    for w, got, v in zip(before, after, variables):
        want = w if "bias" in v.path else w - 0.1 * 0.01 * w  # v = -eps wd w; w += v.
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12, err_msg=v.path)
    assert any(not np.array_equal(w, got) for w, got in zip(before, after))


@pytest.mark.parametrize("policy_name", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_steps_learn_with_lrn_in_float32(policy, policy_name, logical_cpus):
    keras.mixed_precision.set_dtype_policy(policy_name)
    strategy = distribute.mirrored_strategy(logical_cpus[:1])
    # The narrow net under Caffe's fillers passes almost no signal (its loss stays at ln 4 for these 6 steps):
    # Glorot's scale with the fan-in, at a learning rate it does not diverge at. Under float16 the first steps
    # overflow and are skipped while the loss scale comes down (seen: 2.27 thrice, then 1.61, 1.39, 1.20).
    config = Config(batch_size=4, dropout_rate=0.0, learning_rate=1e-4, momentum=0.9)
    model, optimizer = model_and_sgd(strategy, {logical_cpus[0]: logical_cpus[:2]}, config, num_classes=4,
                                     init="glorot", loss_scale=policy_name == "mixed_float16", **NARROW)
    step = make_train_step(strategy, model, optimizer, config)
    images = tf.random.stateless_normal([4, 227, 227, 3], [0, 3], stddev=50)
    labels = tf.constant([0, 1, 2, 3])
    losses = [float(step(images, labels)[0]) / 4 for _ in range(6)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.005, losses
    graph = step.get_concrete_function(images, labels).graph
    lrn_ops = [op for op in graph.get_operations() if "lrn1_a" in op.name and op.type in ("Pow", "MatMul", "Mul")]
    assert lrn_ops and all(op.outputs[0].dtype == tf.float32 for op in lrn_ops)
    assert model.get_layer("conv1_a").layer.compute_dtype == policy_name.split("_")[1]


def mixed_float16_step(devices, images, labels):
    """(weights before, weights after, momentum slots after: the step itself, loss scale after) of one
    mixed_float16 step of a narrow AlexNet on `devices`, one replica each (both towers on its device)."""
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    strategy, plan = distribute.make_strategy(1, devices)
    config = Config(batch_size=len(labels), dropout_rate=0.0, learning_rate=0.01, momentum=0.9)
    model, optimizer = model_and_sgd(strategy, plan, config, init="caffe", loss_scale=True, width=1 / 8)
    before = [v.numpy() for v in model.trainable_variables]
    batches = tf.data.Dataset.from_tensor_slices((images, labels)).batch(len(labels))
    make_train_step(strategy, model, optimizer, config)(*next(iter(strategy.experimental_distribute_dataset(batches))))
    return (before, [v.numpy() for v in model.trainable_variables],
            [m.numpy() for m in optimizer.inner_optimizer.momentums], float(optimizer.dynamic_scale.numpy()))


@pytest.mark.slow
def test_a_float16_overflow_on_one_replica_skips_the_step_on_all(policy, logical_cpus):
    """Replica 1's half of the batch overflows float16 (pixels of 1e5, above its largest 65504), replica 0's does not: every
    replica skips the step and halves the scale, as one device given the whole batch does. (Keras's
    own LossScaleOptimizer takes replica 0's verdict: NaN weights and the scale kept.)"""
    images = tf.random.stateless_normal([4, 227, 227, 3], [0, 5], stddev=50)
    images = tf.concat([images[:2], images[2:] * 0 + 1e5], 0)
    labels = tf.constant([0, 1, 2, 3])
    for devices in logical_cpus[:1], logical_cpus[:2]:
        before, after, slots, scale = mixed_float16_step(devices, images, labels)
        assert scale == 2.0 ** 14, (devices, scale)
        for w, got, slot in zip(before, after, slots):
            np.testing.assert_array_equal(got, w)
            assert not slot.any()


@pytest.mark.slow
def test_a_mixed_float16_step_of_two_replicas_is_one_replicas_step(policy, logical_cpus):
    """Without overflow, 2 replicas take the step of 1 to 2e-3 of each variable's step size: float16's
    rounding (2^-11 = 4.9e-4 a product) summed in another order; seen: 7.9e-4."""
    images, labels = tf.random.stateless_normal([4, 227, 227, 3], [0, 6], stddev=50), tf.constant([0, 1, 2, 3])
    (_, _, one, scale_one), (_, _, two, scale_two) = (mixed_float16_step(d, images, labels)
                                                      for d in (logical_cpus[:1], logical_cpus[:2]))
    assert scale_one == scale_two == 2.0 ** 15
    errors = [np.abs(b - a).max() / np.abs(a).max() for a, b in zip(one, two)]
    print("mixed_float16, 2 replicas against 1: largest difference / step size", max(errors))
    assert max(errors) <= 2e-3, errors

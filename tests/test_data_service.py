"""tf.data service (keras_alexnet.data_service): a dispatcher and 2 workers on 127.0.0.1 serve the training
pipeline's global batches: the local pipeline's, bit for bit and in its order, each once an epoch, also when a
worker is killed mid-epoch; a run through them is the local run."""
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import NARROW, run_program
from keras_alexnet import data, data_service, preprocess, sources
from keras_alexnet.config import Config
from keras_alexnet.errors import UserError

service_lib = tf.data.experimental.service
EPOCH = dict(batch_size=8, seed=3, epoch=1, steps=6)  # A second epoch: its permutation and augmentation keys.


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory):
    """An in-process fault-tolerant dispatcher and 2 workers: the dispatcher's grpc:// address."""
    dispatcher = service_lib.DispatchServer(service_lib.DispatcherConfig(
        work_dir=str(tmp_path_factory.mktemp("dispatcher")), fault_tolerant_mode=True))
    workers = [service_lib.WorkerServer(service_lib.WorkerConfig(dispatcher.target.removeprefix("grpc://"),
                                                                 worker_address="127.0.0.1:%port%"))
               for _ in range(2)]
    yield dispatcher.target
    for server in workers + [dispatcher]:
        server.stop()


@pytest.fixture(scope="module")
def synthetic():
    return sources.load_source("synthetic", "train"), preprocess.Stats.imagenet()


def batches(dataset):
    """A pipeline's batches as bytes (images and labels), each a key comparing bit for bit."""
    return [images.numpy().tobytes() + labels.numpy().tobytes() for images, labels in dataset]


def test_the_service_serves_the_local_epochs_batches(two_workers, synthetic, capfd):
    """Steps 2-5 of an epoch (as a resumed epoch reads them) through 2 workers: the local pipeline's 4
    global batches, bit for bit, in its order, every one of them from the service (none computed here)."""
    source, stats = synthetic
    local = batches(data.train_pipeline(source, stats=stats, first_step=2, **EPOCH))
    capfd.readouterr()
    served = batches(data.train_pipeline(source, stats=stats, first_step=2, service=data_service.on_service(
        two_workers), **EPOCH))
    assert len(local) == len(set(local)) == 4
    assert served == local
    assert "computed here" not in capfd.readouterr().out


@pytest.mark.slow  # Its workers' unfinished tasks hold the servers' stop for 5-30 s.
def test_each_input_pipeline_is_served_its_share_of_every_global_batch(two_workers, synthetic):
    """Two input pipelines (tf.distribute workers) of 2 replicas: each gets its half of every global batch,
    cut into per-replica batches as locally."""
    source, stats = synthetic
    for pipeline in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline,
                                             num_replicas_in_sync=4)
        local = list(data.train_pipeline(source, stats=stats, input_context=context, **EPOCH))
        served = list(data.train_pipeline(source, stats=stats, input_context=context,
                                          service=data_service.on_service(two_workers), **EPOCH))
        assert {images.shape[0] for images, _ in served} == {2}
        pairs = lambda batches: [b"".join(x.numpy().tobytes() for x in batches[i] + batches[i + 1])
                                 for i in range(0, len(batches), 2)]  # A pipeline's 2 replicas' batches of a step.
        assert pairs(served) == pairs(local)


def test_a_silent_dispatcher_sources_the_workers_cannot_read_and_bad_flags_are_one_line(two_workers, free_port,
                                                                                        tmp_path, monkeypatch):
    synthetic = sources.load_source("synthetic", "train")
    with pytest.raises(UserError, match=f"no dispatcher answers at 127.0.0.1:{(port := free_port())}"):
        data_service.check_service(f"127.0.0.1:{port}", synthetic, "synthetic")
    in_order = sources.Source(tf.data.Dataset.range(4), None, ["a", "b"], 4)
    with pytest.raises(UserError, match="needs a split read by index"):
        data_service.check_service(two_workers, in_order, "imagenette")
    python = sources.random_access(4, lambda i: tuple(tf.numpy_function(lambda i: (i, i.astype(np.int32)), [i],
                                                                        (tf.int64, tf.int32))), tf.identity, "ab")
    with pytest.raises(UserError, match="read by Python code"):
        data_service.check_service(two_workers, python, "prepared")
    data_service.check_service(two_workers, synthetic, "synthetic")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()  # A relative folder: the workers would look for it in their own directory.
    with pytest.raises(UserError, match="give its absolute path .*, not images"):
        data_service.check_service(two_workers, synthetic, "images")
    with pytest.raises(UserError, match=re.escape("--data_service must be HOST:PORT or grpc://HOST:PORT (a port up "
                                                  "to 65535), got 'localhost'")):
        Config(data_service="localhost").validate()
    with pytest.raises(UserError, match="--cache with --data_service"):
        Config(data_service="grpc://localhost:5050", cache="memory").validate()


@pytest.mark.parametrize("args, message", [
    ([], "usage: python -m keras_alexnet.data_service dispatcher|worker [flags]"),
    (["dispatcher"], "dispatcher needs --work_dir: where it journals its state, to survive a restart"),
    (["worker"], "worker needs --dispatcher=HOST:PORT"),
    (["worker", "--dispatcher=localhost"],
     "--dispatcher must be HOST:PORT or grpc://HOST:PORT (a port up to 65535), got 'localhost'")])
def test_the_programs_bad_flags_are_one_line(args, message):
    result = run_program("data_service", *args)
    assert (result.returncode, result.stderr.strip()) == (1, f"error: {message}")


def program(*args):
    """`python -m keras_alexnet.data_service ARGS` started, once it has printed the line saying it serves."""
    process = subprocess.Popen([sys.executable, "-m", "keras_alexnet.data_service", *map(str, args)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    assert "tf.data service" in line, process.stderr.read()
    return process


@pytest.mark.slow
def test_a_worker_killed_mid_epoch_loses_its_batches_which_are_computed_here(tmp_path, synthetic, free_port,
                                                                           capfd):
    """The programs: a dispatcher and 2 workers. Worker 2 is killed (SIGKILL) after 2 of 12 batches and
    started again on its port: the epoch is still the local epoch's 12 batches, in order. The service lost
    the batches the dead worker held (at most once, TensorFlow's rule); this process computed each (and
    any that came later than 4 after it) once, and said so."""
    source, stats = synthetic
    dispatcher_port, ports = free_port(), [free_port(), free_port()]
    dispatcher = program("dispatcher", f"--port={dispatcher_port}", f"--work_dir={tmp_path}")
    worker = lambda port: program("worker", f"--dispatcher=127.0.0.1:{dispatcher_port}", f"--port={port}",
                                  "--host=127.0.0.1")
    workers = [worker(port) for port in ports]
    epoch = {**EPOCH, "steps": 12}
    try:
        served = iter(data.train_pipeline(source, stats=stats, service=data_service.on_service(
            f"grpc://127.0.0.1:{dispatcher_port}", window=4), **epoch))
        received = batches(next(served) for _ in range(2))
        workers[1].kill()
        workers[1].wait()
        workers[1] = worker(ports[1])
        received += batches(served)
    finally:
        for process in workers + [dispatcher]:
            process.send_signal(signal.SIGTERM)
        stopped = [process.communicate(timeout=60)[0] for process in workers + [dispatcher]]
    assert received == batches(data.train_pipeline(source, stats=stats, **epoch))
    lost = re.findall(r"step (\d+) of the epoch did not come \(lost with a worker, or late\); computed here",
                      capfd.readouterr().out)
    assert len(lost) == len(set(lost)), lost  # 0 to 3 in 5 runs: what the dead worker held, and late ones.
    assert [process.returncode for process in workers + [dispatcher]] == [0, 0, 0]
    assert [text.strip() for text in stopped] == ["worker stopped", "worker stopped", "dispatcher stopped"]


@pytest.mark.slow
def test_a_run_through_the_service_is_the_local_run(tmp_path, two_workers, final_digest):
    """train --data_service: the same loss and final weights as the same run without it."""
    args = ["--dataset=synthetic", "--batch_size=8", "--epochs=1", "--steps_per_epoch=4", "--eval_steps=1",
            "--cpu_devices=2", f"--width={NARROW['width']}", "--deterministic", "--seed=4"]
    runs = [subprocess.run([sys.executable, "-m", "keras_alexnet.train", *args, f"--model_dir={tmp_path / name}",
                            *extra], capture_output=True, text=True, timeout=300)
            for name, extra in [("local", []), ("served", [f"--data_service={two_workers}"])]]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    losses = [re.search(r"train loss (\S+)", run.stdout).group(1) for run in runs]
    assert losses[0] == losses[1] and final_digest(runs[0].stdout) == final_digest(runs[1].stdout)

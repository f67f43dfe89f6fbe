"""python -m keras_alexnet.benchmark: am I input-bound, and by how much? (as tf_cnn_benchmarks answers it)

One table of img/s on this process's device plan (--towers_per_replica, --cpu_devices, the GPUs):
  model: the trainer's loop of steps (make_train_loop through the strategy) on synthetic batches already on
      the replicas' devices, what the model can take;
  training: the same loop fed by the training pipeline (data.train_pipeline) on --dataset, as the trainer
      feeds it: uint8 crops, made float32 on the devices (data.network_input);
  pipeline: that pipeline alone, and per core.
Every timed function is built once and run before it is timed. The verdict compares the pipeline alone with
the model; on a CPU-only host both share the cores, so `training` is below either.
"""
import itertools
import os
import time

import tensorflow as tf
from absl import app, flags

from keras_alexnet import cli, config, data, preprocess, sources
from keras_alexnet.distribute import describe, make_strategy, mirrored_strategy, split_cpu
from keras_alexnet.errors import UserError
from keras_alexnet.model import INPUT_SHAPE, build_alexnet, tower_variables
from keras_alexnet.optimizer import PaperSGD
from keras_alexnet.step import make_replica_step, make_train_loop, make_train_step
from keras_alexnet.trainer import set_up_process

FLAGS = flags.FLAGS
CONFIG_FLAGS = ("dataset", "data_dir", "batch_size", "width", "towers_per_replica", "cpu_devices", "mixed_precision",
                "steps_per_loop", "pca_lighting", "stats")


def define_flags():
    config.define_flags(CONFIG_FLAGS)
    flags.DEFINE_float("seconds", 10.0, "Time each of the three rates for this long.")


def images_per_second(call, batch_size, seconds=1.5, min_calls=2):
    """img/s of `call` (one batch of `batch_size` a call) over at least `min_calls` calls and `seconds`."""
    calls, start = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - start < seconds:
        call()
        calls += 1
    return batch_size * calls / (time.perf_counter() - start)


def train_step(plan, run, num_classes, strategy=None, rebuild=None):
    """Our training step on `plan` ({replica: [tower A, tower B]}): the model of Config `run` (`rebuild(model)`
    may swap its layers) and PaperSGD. A call (images, labels) -> loss (make_train_step's), with `.strategy`
    (default: a distribute.mirrored_strategy of the plan's replicas) and `.replica_step` (for make_train_loop)."""
    strategy = strategy or mirrored_strategy(list(plan))
    with tower_variables(), strategy.scope():
        model = build_alexnet(num_classes, tower_devices=plan, dropout_rate=run.dropout_rate, init=run.init,
                              seed=run.seed, width=run.width)
        model = rebuild(model) if rebuild else model
        optimizer = PaperSGD(run.learning_rate, momentum=run.momentum, weight_decay=run.weight_decay)
        optimizer.build(model.trainable_variables)
    step = make_train_step(strategy, model, optimizer, run)

    def call(images, labels):
        return step(images, labels)[0].numpy()
    call.strategy, call.replica_step = strategy, make_replica_step(model, optimizer, run)
    return call


def resident_batch(strategy, batch_size, num_classes):
    """A synthetic global batch (images, labels), each replica's slice made on its device."""
    per_replica = batch_size // strategy.num_replicas_in_sync

    def on_device(context):  # By itself the strategy would leave every slice on the first device.
        with tf.device(strategy.extended.worker_devices[context.replica_id_in_sync_group]):
            return (tf.random.normal([per_replica, *INPUT_SHAPE], stddev=50.0),
                    tf.random.uniform([per_replica], 0, num_classes, tf.int32))

    return strategy.experimental_distribute_values_from_function(on_device)


def measure(run, seconds):
    """[(what, img/s)] of the model, of training through the pipeline and of the pipeline alone."""
    source = sources.load_source(run.dataset, "train", run.data_dir, seed=run.seed)
    strategy, plan = make_strategy(run.towers_per_replica)
    data.check_trainable(source, run.dataset, run.batch_size, strategy.num_replicas_in_sync)
    stats = preprocess.Stats.load(run.stats) if run.stats else preprocess.Stats.imagenet()
    step = train_step(plan, run, len(source.class_names), strategy)
    counter = tf.Variable(0, dtype=tf.int64)
    loop = make_train_loop(strategy, step.replica_step, counter)
    fed_loop = make_train_loop(strategy, step.replica_step, counter, data.float_images(stats, strategy))
    synthetic = resident_batch(strategy, run.batch_size, len(source.class_names))

    def pipeline(context=None):  # As the trainer's: uint8 crops to the devices.
        return data.train_pipeline(source, run.batch_size, stats, seed=run.seed, pca_lighting=run.pca_lighting,
                                   input_context=context, to_float=False).repeat()

    steps, images = tf.constant(run.steps_per_loop), run.batch_size * run.steps_per_loop
    resident, fed = itertools.repeat(synthetic), iter(strategy.distribute_datasets_from_function(pipeline))
    calls = {"model": (lambda: loop(resident, steps).numpy(), images),  # One loop each: one trace each.
             "training": (lambda: fed_loop(fed, steps).numpy(), images),
             "pipeline": (iter(pipeline()).__next__, run.batch_size)}
    print(f"devices: {describe(plan)}", flush=True)
    rates = []
    for what, (call, images) in calls.items():
        call()  # Traces, fills the pipeline's buffers.
        rates.append((what, images_per_second(call, images, seconds, min_calls=1)))
    return rates


def table(rates, dataset):
    """The markdown table of measure's rates and its verdict line."""
    cores, model = len(os.sched_getaffinity(0)), rates[0][1]
    names = {"model": "training, synthetic batches on the devices (what the model can take)",
             "training": f"training through the input pipeline on {dataset}",
             "pipeline": f"the input pipeline alone on {dataset}"}
    lines = ["| what | img/s | img/s per core | of the model's |", "|---|---|---|---|"]
    lines += [f"| {names[what]} | {rate:.1f} | {rate / cores:.1f} | {rate / model:.0%} |" for what, rate in rates]
    share = dict(rates)["pipeline"] / model
    if share < 1:
        verdict = (f"input-bound: the pipeline gives {share:.0%} of what the model can take; it needs "
                   f"{cores / share:.0f} cores like these ({cores} here) to feed it")
    else:
        verdict = f"not input-bound: the pipeline gives {share:.1f}x what the model can take"
    return "\n".join(lines + ["", verdict])


@cli.reports_errors
def main(argv):
    del argv
    run = config.config_from_flags()
    if not FLAGS.seconds > 0:
        raise UserError(f"--seconds must be positive, got {FLAGS.seconds}")
    split_cpu(run.cpu_devices)
    set_up_process(run)
    print(table(measure(run, FLAGS.seconds), run.dataset))


if __name__ == "__main__":
    define_flags()
    app.run(main)

"""python -m keras_alexnet.train: the paper's training (section 5) as a MirroredStrategy custom loop.

Data x model parallelism: with --towers_per_replica=2 and D devices there are D/2 replicas; replica i
runs tower A on device 2i and tower B on device 2i+1, the paper's two-GPU split, repeated. Every
replica plan computes the same thing: the pipeline cuts each global batch the same way whatever the
devices (data.py), the loss is averaged over the global batch, and replica gradients are summed.
--steps_per_loop steps run inside one tf.function; between loops the host updates the progress,
writes summaries and checkpoints, and TensorFlow's PreemptionCheckpointHandler turns SIGTERM (and
Ctrl-C) into one checkpoint that every worker saves at the same step, then exit status 0.
"""
import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import time

import keras
import numpy as np
import tensorflow as tf
from absl import app, logging

from keras_alexnet import checkpoint, cli, data, export, filters, metrics, summaries
from keras_alexnet.config import Config, config_from_flags, define_flags
from keras_alexnet.model import INPUT_SHAPE, build_alexnet

HISTORY = "history.jsonl"  # One JSON line per epoch: train and validation metrics, images/s.


# ----------------------------------------------------------------------------------------- devices

def split_cpu(count):
    """Splits the CPU into `count` logical devices (before TensorFlow initialises them)."""
    if count:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)


def make_strategy(towers_per_replica, devices=None):
    """(strategy, plan): plan maps each replica's device to its (tower A, tower B) devices.

    Uses MultiWorkerMirroredStrategy when TF_CONFIG is set, else MirroredStrategy over `devices`
    (default: the local GPUs, or the logical CPUs when there is no GPU).
    """
    # MultiWorkerMirroredStrategy must exist before anything else initialises TensorFlow's devices.
    strategy = tf.distribute.MultiWorkerMirroredStrategy() if os.environ.get("TF_CONFIG") else None
    # Local names ("/device:GPU:1"): inside a replica they take the replica's job and task.
    devices = devices or [f"/device:{d.device_type}:{d.name.rsplit(':', 1)[1]}" for d in
                          tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")]
    if towers_per_replica == 2 and len(devices) % 2 and len(devices) > 1:
        raise ValueError(f"--towers_per_replica=2 pairs the {len(devices)} devices, and {devices[-1]} would be "
                         "left unused: use an even number of devices (--cpu_devices) or --towers_per_replica=1")
    pairs = [(d, d) for d in devices] if towers_per_replica == 1 or len(devices) == 1 else \
        [tuple(devices[i:i + 2]) for i in range(0, len(devices), 2)]
    if strategy:
        replicas = strategy.extended.worker_devices
    else:
        replicas = [a for a, _ in pairs]
        strategy = tf.distribute.MirroredStrategy(replicas)
    plan = {replica: list(pair) for replica, pair in zip(replicas, pairs)}
    return strategy, plan


def is_chief(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "chief" or (not has_chief and resolver.task_type == "worker"
                                             and resolver.task_id == 0)


# ----------------------------------------------------------------------------------------- the step

class WarmupThenPlateau(keras.optimizers.schedules.LearningRateSchedule):
    """base_lr (a variable the plateau rule divides by 10, section 5) after a linear warm-up."""

    def __init__(self, base_lr, warmup_steps):
        self.base_lr, self.warmup_steps = base_lr, warmup_steps

    def __call__(self, step):
        if not self.warmup_steps:
            return tf.identity(self.base_lr)
        return self.base_lr * tf.minimum(1.0, tf.cast(step + 1, tf.float32) / self.warmup_steps)

    def get_config(self):
        return {"warmup_steps": self.warmup_steps}


def decayed(variable, decay_biases):
    """Section 5 decays the 'weights'; biases only with --decay_biases."""
    return decay_biases or "bias" not in variable.path


def make_train_step(strategy, model, optimizer, config):
    """One distributed SGD step: a tf.function (images, labels) -> metrics.totals summed over replicas.

    The loss is averaged over the *global* batch and the replicas' gradients are summed, so any
    number of replicas computes the step of one device. Gradients come from `tf.gradients`, which
    places each gradient op beside its forward op, so tower B's backward pass runs on tower B's
    device, as on the paper's second GPU. With --jit_compile the forward and backward pass of each
    replica are one XLA cluster.
    """
    variables = model.trainable_variables
    # Replica gradients are summed, so each replica adds its share of the decay term.
    decay = [config.weight_decay / strategy.num_replicas_in_sync if decayed(v, config.decay_biases) else 0.0
             for v in variables]
    loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)

    def forward_backward(images, labels):
        probabilities = model(images, training=True)
        totals = metrics.totals(labels, probabilities)
        loss = totals[0] / config.batch_size
        # The loss-scale optimizer divides every gradient by its scale: the decay term is scaled too.
        scale = optimizer.dynamic_scale if loss_scaled else 1.0
        if loss_scaled:
            loss = optimizer.scale_loss(loss)
        gradients = tf.gradients(loss, [v.value for v in variables])
        # v <- m v - eps (wd w + dL/dw): weight decay inside the momentum term, as in section 5.
        gradients = [g + d * scale * tf.cast(v.value, g.dtype) if d else g
                     for g, v, d in zip(gradients, variables, decay)]
        return gradients, totals

    if config.jit_compile:
        forward_backward = tf.function(forward_backward, jit_compile=True)

    def replica_step(images, labels):
        gradients, totals = forward_backward(images, labels)
        optimizer.apply_gradients(zip(gradients, variables))
        return totals

    @tf.function
    def step(images, labels):
        return strategy.reduce("SUM", strategy.run(replica_step, (images, labels)), axis=None)

    return step


def make_train_loop(step, step_counter):
    """A tf.function (distributed iterator, n) running n steps; returns their summed totals.

    The host waits once per loop, not once per step (TF Model Garden's Orbit does the same).
    """

    @tf.function
    def loop(iterator, steps):
        summed = tf.zeros([len(metrics.TOTALS)])
        for _ in tf.range(steps):
            summed += step(*next(iterator))
            step_counter.assign_add(1)
        return summed

    return loop


# ----------------------------------------------------------------------------------------- the loop

class TrainingStuck(Exception):
    """Epochs at chance after enough steps, or a diverged loss: better stopped than run for 90 epochs."""


def is_stuck(loss, num_classes):
    """True when the training loss is within 2% of ln(num_classes), i.e. the net still guesses."""
    return abs(loss - math.log(num_classes)) <= 0.02 * math.log(num_classes)


def weights_digest(model):
    """sha256 of all weights: equal digests mean bit-identical models (resume and multi-worker tests)."""
    digest = hashlib.sha256()
    for variable in model.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(variable.value)).tobytes())
    return digest.hexdigest()[:16]


def check_trainable(train_source, config, replicas):
    """Refuses, before anything is written, data that cannot train (one clear line)."""
    if len(train_source.class_names) < 2:
        raise data.DataError(f"{config.dataset} has {len(train_source.class_names)} class: a classifier needs 2 or more")
    if train_source.num_examples < config.batch_size:
        raise data.DataError(f"{config.dataset} has {train_source.num_examples} training images, fewer than one "
                             f"batch of {config.batch_size}: lower --batch_size")
    if not data.has_readable_image(train_source):
        raise data.DataError(f"{config.dataset}: no training image could be read (all {train_source.num_examples} "
                             "files are corrupt, empty or not images)")
    if config.batch_size % replicas:
        raise ValueError(f"--batch_size {config.batch_size} does not split evenly over {replicas} replicas")


def train(config, strategy, plan):
    """Trains per `config` under `strategy`; returns the final validation metrics."""
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_dtype_policy("float32" if config.mixed_precision == "off" else config.mixed_precision)
    train_source = data.load_source(config.dataset, "train", config.data_dir, seed=config.seed)
    val_source = data.load_source(config.dataset, "validation", config.data_dir, seed=config.seed)
    check_trainable(train_source, config, strategy.num_replicas_in_sync)
    stats = data.Stats.load(config.stats) if config.stats else data.Stats.imagenet()
    steps_per_epoch = min(data.epoch_steps(train_source.num_examples, config.batch_size),
                          config.steps_per_epoch or math.inf)
    num_classes = len(train_source.class_names)
    model_kwargs = {"num_classes": num_classes, "dropout_rate": config.dropout_rate, "init": config.init,
                    **config.model}
    model_kwargs = {**checkpoint.architecture(config.init_from), **model_kwargs}  # E.g. Caffe's LRN constants.
    run_config = {**dataclasses.asdict(config), "model": model_kwargs, "steps_per_epoch": steps_per_epoch,
                  "input_shape": list(INPUT_SHAPE)}
    checkpoint.check_resume(config.model_dir, run_config, train_source.class_names)
    chief = is_chief(strategy)
    logging.info("devices: %s", "; ".join(f"replica {i} on {r} -> towers on {a}, {b}"
                                           for i, (r, (a, b)) in enumerate(plan.items())))

    with strategy.scope():
        model = build_alexnet(**model_kwargs, tower_devices=plan, seed=config.seed)
        if config.init_from:  # A resumed run's checkpoint then replaces these weights.
            checkpoint.load_matching_weights(model, config.init_from)
        base_lr = tf.Variable(config.learning_rate, trainable=False, name="base_lr")
        optimizer = keras.optimizers.SGD(
            WarmupThenPlateau(base_lr, config.warmup_epochs * steps_per_epoch), momentum=config.momentum)
        if config.mixed_precision == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)  # Before the first step, inside the scope.
        state = {name: tf.Variable(value, trainable=False, name=name) for name, value in
                 [("step", tf.constant(0, tf.int64)), ("epoch", tf.constant(0, tf.int64)),
                  ("best_error", 1.0), ("bad_epochs", 0), ("lr_drops", 0), ("stuck_epochs", 0)]}
    ckpt = checkpoint.training_checkpoint(model, optimizer, base_lr=base_lr, **state)
    checkpoint_dir = os.path.join(config.model_dir, checkpoint.CHECKPOINTS)
    manager = tf.train.CheckpointManager(
        ckpt, checkpoint_dir if chief else os.path.join(config.model_dir, f".worker{strategy.cluster_resolver.task_id}"),
        max_to_keep=3)
    latest = tf.train.latest_checkpoint(checkpoint_dir)
    if latest:
        ckpt.restore(latest).assert_existing_objects_matched()
        logging.info("resumed from %s at step %d, epoch %d", latest, state["step"].numpy(), state["epoch"].numpy())
    if chief and not tf.io.gfile.exists(os.path.join(config.model_dir, checkpoint.CONFIG)):
        checkpoint.write_run_files(config.model_dir, run_config, train_source.class_names, stats)
    writers = {split: tf.summary.create_file_writer(os.path.join(config.model_dir, split)) if chief
               else tf.summary.create_noop_writer() for split in ("train", "validation")}

    def stopped():
        step = int(state["step"].numpy())
        if not chief:
            tf.io.gfile.rmtree(manager.directory)
        print(f"SIGTERM: stopped at step {step}; checkpoint saved in {checkpoint_dir}. "
              "Run the same command to resume.", flush=True)
        sys.exit(0)

    preemption = tf.distribute.experimental.PreemptionCheckpointHandler(
        getattr(strategy, "cluster_resolver", None), manager,
        termination_config=tf.distribute.experimental.TerminationConfig(exit_fn=stopped))
    signal.signal(signal.SIGINT, lambda *_: signal.raise_signal(signal.SIGTERM))  # Ctrl-C saves too.

    train_loop = make_train_loop(make_train_step(strategy, model, optimizer, config), state["step"])
    eval_step = metrics.make_eval_step(strategy, model)
    val_data = strategy.distribute_datasets_from_function(
        lambda ctx: data.eval_pipeline(val_source, config.batch_size, stats, input_context=ctx,
                                       steps=config.eval_steps, cache=config.cache))

    def save(reason):
        path = manager.save(checkpoint_number=state["step"])
        logging.info("saved %s (%s)", path, reason)

    if config.cache:
        print(f"first, {train_source.num_examples} training and {val_source.num_examples} validation images "
              f"are decoded into the {config.cache} cache", flush=True)
    metrics_ = {}
    while int(state["epoch"].numpy()) < config.epochs:
        epoch = int(state["epoch"].numpy())
        done = int(state["step"].numpy()) - epoch * steps_per_epoch  # Steps of this epoch already taken.
        iterator = iter(strategy.distribute_datasets_from_function(
            lambda ctx: data.train_pipeline(
                train_source, config.batch_size, stats, seed=config.seed, epoch=epoch, first_step=done,
                steps=steps_per_epoch, pca_lighting=config.pca_lighting, cache=config.cache, input_context=ctx,
                shuffle_buffer=config.shuffle_buffer)))
        progress = summaries.Progress(f"epoch {epoch + 1}/{config.epochs}", steps_per_epoch, done,
                                      config.batch_size, float(optimizer.learning_rate),
                                      traced=train_loop.experimental_get_tracing_count() > 0)
        summed = np.zeros(len(metrics.TOTALS))
        while done < steps_per_epoch:
            step = int(state["step"].numpy())
            steps = min(config.steps_per_loop, steps_per_epoch - done,
                        config.checkpoint_every - step % config.checkpoint_every)
            loop_totals = train_loop(iterator, tf.constant(steps)).numpy()
            summed += loop_totals
            done, step = done + steps, step + steps
            loop_metrics = metrics.errors(loop_totals)
            if not math.isfinite(loop_metrics["loss"]):
                raise TrainingStuck(f"the training loss is {loop_metrics['loss']} at step {step}: it diverged; "
                                    "lower --learning_rate or try --init=caffe")
            speed = progress.update(done, steps, metrics.errors(summed))
            with writers["train"].as_default(step=step):
                tf.summary.scalar("loss", loop_metrics["loss"])
                tf.summary.scalar("learning_rate", float(optimizer.learning_rate))
                if speed:
                    tf.summary.scalar("images_per_second", speed)
            preemption.save_checkpoint_if_preempted(checkpoint_number=step)
            if step % config.checkpoint_every == 0:
                save("checkpoint_every")
        train_metrics = metrics.errors(summed)
        if not train_metrics["images"]:
            raise data.DataError(f"no image of {config.dataset} could be read in epoch {epoch + 1}")
        metrics_ = metrics.evaluate(eval_step, val_data, progress=False)
        state["epoch"].assign_add(1)
        _update_learning_rate(state, base_lr, metrics_["top1_error"], config)
        stuck = is_stuck(train_metrics["loss"], num_classes)
        state["stuck_epochs"].assign(state["stuck_epochs"] + 1 if stuck else 0)
        _write_epoch_summaries(writers, model, int(state["step"].numpy()), train_metrics, metrics_, chief)
        save("epoch end")
        corrupt = progress.images - train_metrics["images"]
        print(f"epoch {epoch + 1}: train loss {train_metrics['loss']:.4f} top-1 err {train_metrics['top1_error']:.2%} | "
              f"val loss {metrics_['loss']:.4f} top-1 err {metrics_['top1_error']:.2%} "
              f"top-5 err {metrics_['top5_error']:.2%} | {progress.speed:.1f} img/s"
              + (f" | {corrupt} unreadable images skipped" if corrupt else ""), flush=True)
        if chief:
            with tf.io.gfile.GFile(os.path.join(config.model_dir, HISTORY), "a") as f:
                f.write(json.dumps({"epoch": epoch + 1, "step": int(state["step"].numpy()), "train": train_metrics,
                                    "validation": metrics_, "images_per_second": progress.speed}) + "\n")
        _check_stuck(int(state["stuck_epochs"].numpy()), int(state["step"].numpy()), train_metrics["loss"],
                     num_classes, config)
    print(f"final weights digest {weights_digest(model)} at step {int(state['step'].numpy())}")
    exported = None
    if config.export_dir and chief:
        exported = export.export_saved_model(model, train_source.class_names, stats, config.export_dir,
                                             int(state["step"].numpy()))
    if not chief:
        tf.io.gfile.rmtree(manager.directory)
    else:
        _print_next_steps(config.model_dir, exported)
    return metrics_


def _print_next_steps(model_dir, exported):
    python = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else "python"
    print(f"\nwrote checkpoints, config.json, labels.txt, stats.npz and history.jsonl to {model_dir}"
          + (f"\nexported a SavedModel to {exported}" if exported else ""))
    print("next:")
    print(f"  {python} -m keras_alexnet.evaluate --model_dir={model_dir}      # centre-crop and 10-crop error")
    if exported:
        print(f"  saved_model_cli show --dir {exported} --all")
        print(f"  {python} -m keras_alexnet.embed --saved_model={exported} --dataset=synthetic "
              f"--logdir={model_dir}/embeddings --max_images=500")
    print(f"  tensorboard --logdir={model_dir}      # curves, histograms, conv1 kernels, the projector")


def _check_stuck(stuck_epochs, step, loss, num_classes, config):
    """Warns after 2 epochs at chance; stops after 3 once --stuck_steps steps are done (runs that
    learn leave chance within ~100 steps at batch 64 on ImageNette, README)."""
    if stuck_epochs >= 2:  # Epoch 1 often ends near chance on runs that then learn.
        print(f"warning: training loss {loss:.3f} is within 2% of ln({num_classes}) = "
              f"{math.log(num_classes):.3f} for {stuck_epochs} epochs: the net is not learning. Try "
              "--init=caffe, a lower --learning_rate (e.g. 0.001) or --warmup_epochs=2.")
    if stuck_epochs >= 3 and config.stuck_steps and step >= config.stuck_steps:
        raise TrainingStuck(f"stopped at step {step} after {stuck_epochs} epochs at chance; see the warning above "
                            "(--stuck_steps=0 never stops)")


def _update_learning_rate(state, base_lr, val_error, config):
    """Section 5: divide the learning rate by 10 when the validation error stops improving."""
    val_error = np.float32(val_error)  # As best_error holds it: an equal error is no improvement.
    if val_error < state["best_error"].numpy():
        state["best_error"].assign(val_error)
        state["bad_epochs"].assign(0)
        return
    state["bad_epochs"].assign_add(1)
    if int(state["bad_epochs"].numpy()) >= config.lr_patience and int(state["lr_drops"].numpy()) < config.max_lr_drops:
        base_lr.assign(base_lr / 10)
        state["lr_drops"].assign_add(1)
        state["bad_epochs"].assign(0)
        logging.info("validation error did not improve: learning rate now %g", float(base_lr.numpy()))


def _write_epoch_summaries(writers, model, step, train_metrics, val_metrics, chief):
    with writers["train"].as_default(step=step):
        for key in ("loss", "top1_error", "top5_error"):
            tf.summary.scalar(f"epoch_{key}", train_metrics[key])
        if chief:
            for variable in model.trainable_variables:
                summaries.histogram(variable.path, variable.value, step)
            towers = filters.kernels_from_model(model)  # Figure 3: tower A beside tower B.
            grid = np.concatenate([filters.kernel_grid([kernels], 8) for kernels in towers], 1)
            tf.summary.image("conv1_kernels", grid[None])
    with writers["validation"].as_default(step=step):
        for key in ("loss", "top1_error", "top5_error"):
            tf.summary.scalar(f"epoch_{key}", val_metrics[key])


@cli.reports_errors(TrainingStuck)
@cli.reports_errors(TrainingStuck)
def main(argv):
    del argv
    config = config_from_flags()
    split_cpu(config.cpu_devices)
    strategy, plan = make_strategy(config.towers_per_replica)
    train(config, strategy, plan)


if __name__ == "__main__":
    define_flags()
    app.run(main)

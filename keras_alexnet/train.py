"""python -m keras_alexnet.train: the paper's training (section 5) as a MirroredStrategy custom loop.

Data x model parallelism: with --towers_per_replica=2 and D devices there are D/2 replicas; replica i
runs tower A on device 2i and tower B on device 2i+1, the paper's two-GPU split, repeated. Every step
is resumable from --model_dir; SIGINT/SIGTERM save a checkpoint before exiting.
"""
import dataclasses
import hashlib
import json
import math
import os
import signal
import sys
import time
import typing

import keras
import numpy as np
import tensorflow as tf
from absl import app, flags, logging

from keras_alexnet import checkpoint, cli, data, evaluate, export, filters
from keras_alexnet.model import INITS, build_alexnet

FLAGS = flags.FLAGS
HISTORY = "history.jsonl"  # One JSON line per epoch: train and validation metrics, images/s.


def option(default, help, choices=None):
    """A Config field that is also a command-line flag."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass
class Config:
    """Everything a run depends on: one flag per field, written to config.json beside the checkpoints.

    Section 5's recipe is the default, except `init`: the paper's biases of 1 leave small datasets at
    chance (README, "Training on your own images"), so Caffe's fillers are; --init=paper restores it.
    """
    dataset: str = option("synthetic", "'synthetic' (built-in, offline), a folder of class folders, "
                          "or a TFDS name such as imagenet2012 or imagenette/320px-v2.")
    data_dir: str | None = option(None, "TFDS data directory (manual_dir for imagenet2012 lives below it).")
    model_dir: str = option("runs/alexnet", "Checkpoints, TensorBoard logs, labels.txt, config.json.")
    batch_size: int = option(128, "Global batch size (section 5: 128).")
    epochs: int = option(90, "Epochs to train (section 5: roughly 90).")
    steps_per_epoch: int | None = option(None, "Cap on steps per epoch; default: one pass over the split.")
    eval_steps: int | None = option(None, "Cap on validation batches per epoch; default: the whole split.")
    learning_rate: float = option(0.01, "Initial learning rate epsilon (section 5: 0.01).")
    momentum: float = option(0.9, "Momentum (section 5: 0.9).")
    weight_decay: float = option(5e-4, "L2 weight decay inside the momentum update (section 5: 0.0005).")
    decay_biases: bool = option(False, "Apply weight decay to biases too (section 5 says 'weights').")
    warmup_epochs: int = option(0, "Linear learning-rate warm-up over this many epochs (not in the paper).")
    lr_patience: int = option(2, "Epochs without a better validation error before lr /= 10 (the paper "
                              "gives no number).")
    max_lr_drops: int = option(3, "How often the learning rate may be divided by 10 (section 5: 3).")
    init: str = option("caffe", "Initialisation: paper (section 5), caffe (bvlc_alexnet), glorot.", list(INITS))
    dropout_rate: float = option(0.5, "Dropout after fc6 and fc7 (section 4.2).")
    towers_per_replica: int = option(2, "2: the paper's two towers on two devices per replica; 1: every "
                                     "device is a replica running both towers.")
    cpu_devices: int = option(0, "Split the CPU into this many logical devices (0: leave it).")
    mixed_precision: str = option("off", "Keras mixed-precision policy (mixed_float16 adds loss scaling).",
                                  ["off", "mixed_float16", "mixed_bfloat16"])
    jit_compile: bool = option(False, "Compile each replica's forward and backward pass with XLA.")
    seed: int = option(0, "Seed of the initial weights, dropout and augmentation.")
    deterministic: bool = option(False, "Deterministic kernels: a resumed run ends as an uninterrupted one.")
    checkpoint_every: int = option(500, "Save a checkpoint every this many steps (and at each epoch end).")
    stats: str | None = option(None, ".npz from keras_alexnet.stats; default: ImageNet's means and eigen "
                               "figures.")
    pca_lighting: bool = option(True, "Fancy-PCA lighting augmentation (section 4.1).")
    shuffle_buffer: int = option(2048, "Images in the shuffle buffer (192 KiB each).")
    cache: str | None = option(None, "Cache decoded 256x256 images: 'memory' or a file path.")
    export_dir: str | None = option(None, "Export a SavedModel to EXPORT_DIR/<step>/ when training ends.")
    model: dict = dataclasses.field(default_factory=dict)  # Extra build_alexnet arguments (ablations).

    def validate(self):
        positive = ["batch_size", "epochs", "learning_rate", "checkpoint_every", "shuffle_buffer"]
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")
        for name in ["steps_per_epoch", "eval_steps"]:
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")
        for name in ["weight_decay", "warmup_epochs", "lr_patience", "max_lr_drops", "cpu_devices"]:
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must not be negative, got {getattr(self, name)}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"--momentum must be in [0, 1), got {self.momentum}")
        if not 0 <= self.dropout_rate < 1:
            raise ValueError(f"--dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if self.towers_per_replica not in (1, 2):
            raise ValueError(f"--towers_per_replica must be 1 or 2, got {self.towers_per_replica}")
        if self.stats and not tf.io.gfile.exists(self.stats):
            raise ValueError(f"--stats file {self.stats} does not exist")
        return self


def define_flags():
    """One absl flag per Config field, with its default and help."""
    define = {str: flags.DEFINE_string, int: flags.DEFINE_integer, float: flags.DEFINE_float,
              bool: flags.DEFINE_boolean}
    for field in dataclasses.fields(Config):
        if "help" not in field.metadata:
            continue
        kind = next(t for t in typing.get_args(field.type) or (field.type,) if t is not type(None))
        if field.metadata["choices"]:
            flags.DEFINE_enum(field.name, field.default, field.metadata["choices"], field.metadata["help"])
        else:
            define[kind](field.name, field.default, field.metadata["help"])


def config_from_flags():
    return Config(**{f.name: getattr(FLAGS, f.name) for f in dataclasses.fields(Config)
                     if f.name in FLAGS}).validate()


# ----------------------------------------------------------------------------------------- devices

def split_cpu(count):
    """Splits the CPU into `count` logical devices (before TensorFlow initialises them)."""
    if count:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)


def make_strategy(towers_per_replica):
    """(strategy, plan): plan maps each replica's device to its (tower A, tower B) devices.

    Uses MultiWorkerMirroredStrategy when TF_CONFIG is set, else MirroredStrategy over the local
    GPUs, or the logical CPUs when there is no GPU.
    """
    # MultiWorkerMirroredStrategy must exist before anything else initialises TensorFlow's devices.
    strategy = tf.distribute.MultiWorkerMirroredStrategy() if os.environ.get("TF_CONFIG") else None
    # Local names ("/device:GPU:1"): inside a replica they take the replica's job and task.
    devices = [f"/device:{d.device_type}:{d.name.rsplit(':', 1)[1]}" for d in
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


# ----------------------------------------------------------------------------------------- the loop

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
    """One distributed SGD step; the loss is averaged over the *global* batch.

    Gradients come from `tf.gradients`, which places each gradient op beside its forward op, so
    tower B's backward pass runs on tower B's device, as on the paper's second GPU (a GradientTape
    puts the whole backward pass on the replica's device). With --jit_compile the forward and
    backward pass of each replica are one XLA cluster.
    """
    variables = model.trainable_variables
    # Replica gradients are summed, so each replica adds its share of the decay term.
    decay = [config.weight_decay / strategy.num_replicas_in_sync if decayed(v, config.decay_biases) else 0.0
             for v in variables]

    def forward_backward(images, labels):
        probabilities = model(images, training=True)
        losses = keras.losses.sparse_categorical_crossentropy(labels, probabilities)
        loss = tf.nn.compute_average_loss(losses, global_batch_size=config.batch_size)
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            loss = optimizer.scale_loss(loss)
        gradients = tf.gradients(loss, [v.value for v in variables])
        # v <- m v - eps (wd w + dL/dw): weight decay inside the momentum term, as in section 5.
        gradients = [g + d * tf.cast(v.value, g.dtype) if d else g
                     for g, v, d in zip(gradients, variables, decay)]
        metrics = {"loss": tf.reduce_sum(losses), "top1": evaluate.hits(labels, probabilities, 1),
                   "top5": evaluate.hits(labels, probabilities, 5)}
        return gradients, metrics

    if config.jit_compile:
        forward_backward = tf.function(forward_backward, jit_compile=True)

    def replica_step(images, labels):
        gradients, metrics = forward_backward(images, labels)
        optimizer.apply_gradients(zip(gradients, variables))
        return metrics

    @tf.function
    def step(images, labels):
        totals = strategy.run(replica_step, (images, labels))
        return {k: strategy.reduce("SUM", v, axis=None) for k, v in totals.items()}

    return step


class TrainingStuck(Exception):
    """Three epochs in a row at chance, or a diverged loss: better stopped than run for 90 epochs."""


def is_stuck(loss, num_classes):
    """True when the training loss is within 2% of ln(num_classes), i.e. the net still guesses."""
    return abs(loss - math.log(num_classes)) <= 0.02 * math.log(num_classes)


def weights_digest(model):
    """sha256 of all weights: equal digests mean bit-identical models (resume and multi-worker tests)."""
    digest = hashlib.sha256()
    for variable in model.weights:
        digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(variable.value)).tobytes())
    return digest.hexdigest()[:16]


class StopRequested:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step, so it can save first."""

    def __init__(self):
        self.signal = None
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name


def is_chief(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "chief" or (not has_chief and resolver.task_type == "worker"
                                             and resolver.task_id == 0)


def train(config, strategy, plan):
    """Trains per `config` under `strategy`; returns the final validation metrics."""
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    if config.mixed_precision != "off":
        keras.mixed_precision.set_dtype_policy(config.mixed_precision)
    train_source = data.load_source(config.dataset, "train", config.data_dir, seed=config.seed)
    val_source = data.load_source(config.dataset, "validation", config.data_dir, seed=config.seed)
    stats = data.Stats.load(config.stats) if config.stats else data.Stats.imagenet()
    steps_per_epoch = min(train_source.num_examples // config.batch_size, config.steps_per_epoch or math.inf)
    if steps_per_epoch < 1:
        raise data.DataError(f"{config.dataset} has fewer training images than one batch of {config.batch_size}")
    num_classes = len(train_source.class_names)
    model_kwargs = {"num_classes": num_classes, "dropout_rate": config.dropout_rate, "init": config.init,
                    **config.model}
    chief = is_chief(strategy)
    logging.info("devices: %s", "; ".join(f"replica {i} on {r} -> towers on {a}, {b}"
                                           for i, (r, (a, b)) in enumerate(plan.items())))

    with strategy.scope():
        model = build_alexnet(**model_kwargs, tower_devices=plan, seed=config.seed)
        base_lr = tf.Variable(config.learning_rate, trainable=False, name="base_lr")
        optimizer = keras.optimizers.SGD(
            WarmupThenPlateau(base_lr, config.warmup_epochs * steps_per_epoch), momentum=config.momentum)
        if config.mixed_precision == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)  # Before the first step, inside the scope.
        state = {name: tf.Variable(value, trainable=False, name=name) for name, value in
                 [("step", tf.constant(0, tf.int64)), ("epoch", tf.constant(0, tf.int64)),
                  ("best_error", 1.0), ("bad_epochs", 0), ("lr_drops", 0), ("stuck_epochs", 0)]}
    ckpt = tf.train.Checkpoint(model=model, optimizer=optimizer, base_lr=base_lr,
                               dropout_rng=[v.value for v in model.non_trainable_variables], **state)
    checkpoint_dir = os.path.join(config.model_dir, checkpoint.CHECKPOINTS)
    manager = tf.train.CheckpointManager(
        ckpt, checkpoint_dir if chief else os.path.join(config.model_dir, f".worker{strategy.cluster_resolver.task_id}"),
        max_to_keep=3)
    latest = tf.train.latest_checkpoint(checkpoint_dir)
    if latest:
        ckpt.restore(latest).assert_existing_objects_matched()
        logging.info("resumed from %s at step %d, epoch %d", latest, state["step"].numpy(), state["epoch"].numpy())
    if chief:
        run_config = {**dataclasses.asdict(config), "model": model_kwargs, "steps_per_epoch": steps_per_epoch}
        checkpoint.write_run_files(config.model_dir, run_config, train_source.class_names, stats)
    writers = {split: tf.summary.create_file_writer(os.path.join(config.model_dir, split)) if chief
               else tf.summary.create_noop_writer() for split in ("train", "validation")}

    train_step = make_train_step(strategy, model, optimizer, config)
    eval_step = evaluate.make_eval_step(strategy, model)
    stop = StopRequested()
    val_data = strategy.distribute_datasets_from_function(
        lambda ctx: data.eval_pipeline(val_source, config.batch_size, stats, input_context=ctx)
        .take(config.eval_steps or -1))

    def save(reason):
        path = manager.save(checkpoint_number=state["step"])
        logging.info("saved %s (%s)", path, reason)

    metrics = {}
    while int(state["epoch"].numpy()) < config.epochs:
        epoch = int(state["epoch"].numpy())
        done = int(state["step"].numpy()) - epoch * steps_per_epoch  # Steps of this epoch already taken.
        epoch_seed = config.seed * 1_000_003 + epoch
        train_data = strategy.distribute_datasets_from_function(
            lambda ctx: data.train_pipeline(
                train_source, config.batch_size, stats, seed=epoch_seed, pca_lighting=config.pca_lighting,
                cache=config.cache, input_context=ctx, shuffle_buffer=config.shuffle_buffer)
            .skip(done).take(steps_per_epoch - done))
        print(f"Epoch {epoch + 1}/{config.epochs}  lr {float(optimizer.learning_rate):.2g}")
        bar = keras.utils.Progbar(steps_per_epoch, stateful_metrics=["loss", "top1_err", "top5_err", "img/s"])
        bar.update(done)
        totals = {"loss": 0.0, "top1": 0.0, "top5": 0.0}
        images_seen, speed = 0, 0.0
        for images, labels in train_data:
            out = train_step(images, labels)
            state["step"].assign_add(1)
            step = int(state["step"].numpy())
            for key in totals:
                totals[key] += float(out[key])
            if not math.isfinite(totals["loss"]):
                raise TrainingStuck(f"the training loss is {totals['loss']} at step {step}: it diverged; "
                                    "lower --learning_rate or try --init=caffe")
            images_seen += config.batch_size
            if images_seen == config.batch_size:  # Time from the end of the first step: no tracing.
                started = time.perf_counter()
            else:
                speed = (images_seen - config.batch_size) / (time.perf_counter() - started)
            bar.update(step - epoch * steps_per_epoch, [
                ("loss", totals["loss"] / images_seen), ("top1_err", 1 - totals["top1"] / images_seen),
                ("top5_err", 1 - totals["top5"] / images_seen), ("img/s", speed)])
            if step % 20 == 0:
                with writers["train"].as_default(step=step):
                    tf.summary.scalar("loss", float(out["loss"]) / config.batch_size)
                    tf.summary.scalar("learning_rate", float(optimizer.learning_rate))
                    tf.summary.scalar("images_per_second", speed)
            if stop.signal:
                save(stop.signal)
                print(f"{stop.signal}: stopped at step {step}; checkpoint saved in {checkpoint_dir}. "
                      "Run the same command to resume.")
                sys.exit(0)
            if step % config.checkpoint_every == 0:
                save("checkpoint_every")
        seen = max(images_seen, 1)
        train_metrics = {"loss": totals["loss"] / seen, "top1_error": 1 - totals["top1"] / seen,
                         "top5_error": 1 - totals["top5"] / seen}
        metrics = evaluate.evaluate(eval_step, val_data, progress=False)
        state["epoch"].assign_add(1)
        _update_learning_rate(state, base_lr, metrics["top1_error"], config)
        stuck = is_stuck(train_metrics["loss"], num_classes) if images_seen else False
        state["stuck_epochs"].assign(state["stuck_epochs"] + 1 if stuck else 0)
        _write_epoch_summaries(writers, model, int(state["step"].numpy()), train_metrics, metrics, chief)
        save("epoch end")
        print(f"epoch {epoch + 1}: train loss {train_metrics['loss']:.4f} top-1 err {train_metrics['top1_error']:.2%} | "
              f"val loss {metrics['loss']:.4f} top-1 err {metrics['top1_error']:.2%} "
              f"top-5 err {metrics['top5_error']:.2%} | {speed:.1f} img/s")
        if chief:
            with tf.io.gfile.GFile(os.path.join(config.model_dir, HISTORY), "a") as f:
                f.write(json.dumps({"epoch": epoch + 1, "step": int(state["step"].numpy()), "train": train_metrics,
                                    "validation": metrics, "images_per_second": speed}) + "\n")
        skipped = train_source.skipped()
        logging.info("unreadable image files skipped so far: %d", skipped)
        if skipped:
            print(f"skipped {skipped} unreadable image files so far")
        stuck_epochs = int(state["stuck_epochs"].numpy())
        if stuck_epochs >= 2:  # Epoch 1 often ends near chance on runs that then learn.
            print(f"warning: training loss {train_metrics['loss']:.3f} is within 2% of ln({num_classes}) = "
                  f"{math.log(num_classes):.3f} for {stuck_epochs} epochs: the net is not learning. Try "
                  "--init=caffe, a lower --learning_rate (e.g. 0.001) or --warmup_epochs=2.")
        if stuck_epochs >= 3:
            raise TrainingStuck("stopped after 3 epochs at chance; see the warning above")
    print(f"final weights digest {weights_digest(model)} at step {int(state['step'].numpy())}")
    if config.export_dir and chief:
        path = export.export_saved_model(model, train_source.class_names, stats, config.export_dir,
                                         int(state["step"].numpy()))
        print(f"exported SavedModel to {path}")
    if not chief:
        tf.io.gfile.rmtree(manager.directory)
    return metrics


def _update_learning_rate(state, base_lr, val_error, config):
    """Section 5: divide the learning rate by 10 when the validation error stops improving."""
    if val_error < float(state["best_error"].numpy()):
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
                tf.summary.histogram(variable.path, variable.value)
            towers = filters.kernels_from_model(model)  # Figure 3: tower A beside tower B.
            grid = np.concatenate([filters.kernel_grid([kernels], 8) for kernels in towers], 1)
            tf.summary.image("conv1_kernels", grid[None])
    with writers["validation"].as_default(step=step):
        for key in ("loss", "top1_error", "top5_error"):
            tf.summary.scalar(f"epoch_{key}", val_metrics[key])


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

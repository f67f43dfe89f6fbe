"""The training of section 5 as a library: a Trainer runs a MirroredStrategy custom loop, epoch by epoch.

Data x model parallelism (distribute.py): each replica runs the paper's two towers on two devices. Every
replica plan computes the same thing: the pipeline cuts each global batch the same way whatever the
devices (data.py), the loss is averaged over the global batch, and replica gradients are summed.
--steps_per_loop steps run inside one tf.function; between loops the host updates the progress,
writes summaries and checkpoints, and TensorFlow's PreemptionCheckpointHandler turns SIGTERM (and
Ctrl-C) into one checkpoint that every worker saves at the same step, then exit status 0 (or
--preemption_exit_code). The handler polls our own SIGTERM flag each second, also on GCP's GPU VMs
(`_watch_for_sigterm` says where not).
"""
import dataclasses
import json
import math
import os
import signal
import sys
import threading

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from tensorflow.python.distribute.failure_handling import failure_handling_util  # PlatformDevice: no public API.

from keras_alexnet import (checkpoint, data, data_service, figures, metrics, preprocess, progress, sources,
                           summaries, weights)
from keras_alexnet.distribute import describe, is_chief
from keras_alexnet.epoch_rules import TrainingStuck, check_stuck, is_stuck, stuck_warning, update_learning_rate
from keras_alexnet.errors import UserError
from keras_alexnet.model import INPUT_SHAPE, build_alexnet, conv1_kernels, tower_variables
from keras_alexnet.optimizer import LossScaleOptimizer, PaperSGD
from keras_alexnet.step import WarmupThenPlateau, make_replica_step, make_train_loop


def set_up_process(config):
    """What a run sets for its whole process, before its Trainer is built (train.main does it; so must
    any program that builds a Trainer): the seed, deterministic kernels (and no TF32 matmuls, on by
    default on Ampere GPUs), the dtype policy, and Ctrl-C handled as SIGTERM (a checkpoint, then exit 0).
    None of it initialises TensorFlow's devices (MultiWorkerMirroredStrategy comes after)."""
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
        tf.config.experimental.enable_tensor_float_32_execution(False)
    keras.mixed_precision.set_dtype_policy(_policy(config))
    if config.mixed_precision == "mixed_bfloat16":
        _warn_of_old_gpus()
    signal.signal(signal.SIGINT, _interrupt)


def _warn_of_old_gpus():
    """bfloat16 kernels need compute capability 8.0 (Ampere); before it they are float32 kernels between casts."""
    for gpu in tf.config.list_physical_devices("GPU"):
        capability = tf.config.experimental.get_device_details(gpu).get("compute_capability")
        if capability and capability < (8, 0):
            print(f"warning: --mixed_precision=mixed_bfloat16 on {gpu.name}, of compute capability "
                  f"{'.'.join(map(str, capability))}: bfloat16 needs 8.0 or newer, below it runs float32 kernels "
                  "between casts, slower than float32; use mixed_float16 there", flush=True)
            return


def _interrupt(signum, frame):
    """Ctrl-C: as SIGTERM while a run's handler is there (a checkpoint, exit 0), else KeyboardInterrupt."""
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, signal.SIG_IGN, None):
        raise KeyboardInterrupt
    signal.raise_signal(signal.SIGTERM)


def _policy(config):
    return "float32" if config.mixed_precision == "off" else config.mixed_precision


class Trainer:
    """A training run: its data, model, optimizer, checkpoints and summaries, epoch by epoch."""

    def __init__(self, config, strategy, plan):
        if keras.mixed_precision.dtype_policy().name != _policy(config):
            raise ValueError(f"the dtype policy is {keras.mixed_precision.dtype_policy().name}, not "
                             f"{_policy(config)}: call trainer.set_up_process(config) before building a Trainer")
        if config.jit_compile and any(a != b for a, b in plan.values()):
            raise UserError("--jit_compile with two towers on two devices: XLA would run both on one device "
                            "(it ignores tf.device, tensorflow/tensorflow#124880); use --towers_per_replica=1 with it")
        self.config, self.strategy, self.chief = config, strategy, is_chief(strategy)
        self.train_source = sources.load_source(config.dataset, "train", config.data_dir, seed=config.seed)
        self.val_source = sources.load_source(config.dataset, "validation", config.data_dir, seed=config.seed,
                                              class_names=self.train_source.class_names)
        data.check_trainable(self.train_source, config.dataset, config.batch_size, strategy.num_replicas_in_sync)
        if config.data_service:
            data_service.check_service(config.data_service, self.train_source, config.dataset)
        self.stats = preprocess.Stats.load(config.stats) if config.stats else preprocess.Stats.imagenet()
        self.steps_per_epoch = min(data.epoch_steps(self.train_source.num_examples, config.batch_size),
                                   config.steps_per_epoch or math.inf)
        narrow = {"width": config.width} if config.width != 1 else {}  # Runs of the paper's net keep their config.
        model_kwargs = {**weights.architecture(config.init_from),  # E.g. Caffe's LRN constants.
                        "num_classes": len(self.train_source.class_names), "dropout_rate": config.dropout_rate,
                        "init": config.init, **narrow, **config.model}
        run_config = {**dataclasses.asdict(config), "model": model_kwargs, "steps_per_epoch": self.steps_per_epoch,
                      "input_shape": list(INPUT_SHAPE)}
        self.lock = checkpoint.RunLock(config.model_dir) if self.chief else None  # Before the run is read.
        try:
            self._open(run_config, model_kwargs, plan)
        except BaseException:
            self.close()
            raise

    def _open(self, run_config, model_kwargs, plan):
        """The run's model, optimizer and state, restored or new; its writers, step functions and validation data."""
        config, strategy = self.config, self.strategy
        changes = checkpoint.check_resume(config.model_dir, run_config, self.train_source.class_names)
        logging.info("devices: %s", describe(plan))
        self._build(model_kwargs, plan)
        self._restore_or_create(run_config)
        self.writers = {split: tf.summary.create_file_writer(os.path.join(config.model_dir, split)) if self.chief
                        else tf.summary.create_noop_writer() for split in ("train", "validation")}
        self.signalled = threading.Event()  # SIGTERM or Ctrl-C (_watch_for_sigterm).
        self.preemption = tf.distribute.experimental.PreemptionCheckpointHandler(
            getattr(strategy, "cluster_resolver", None), self.manager,
            termination_config=tf.distribute.experimental.TerminationConfig(
                termination_watcher_fn=self.signalled.is_set, exit_fn=self._stopped, grace_period=0))
        self._watch_for_sigterm()
        if changes:  # After the handler, which restores the latest checkpoint once more.
            self._apply(changes)
        self.train_loop = make_train_loop(strategy, make_replica_step(self.model, self.optimizer, config),
                                          self.state["step"], data.float_images(self.stats, strategy))
        self.eval_step = metrics.make_eval_step(strategy, self.model)
        if config.cache:
            self._fill_caches()
        self.val_data = strategy.distribute_datasets_from_function(
            lambda ctx: data.eval_pipeline(self.val_source, config.batch_size, self.stats, input_context=ctx,
                                           steps=config.eval_steps, cache=config.cache))

    def fit(self):
        """The epochs left to train; returns the last validation metrics ({} when none were left)."""
        val_metrics = {}
        try:
            while self.epoch < self.config.epochs:
                val_metrics = self.end_epoch(self.train_epoch())
            self.finish()
        finally:
            self.close()
        return val_metrics

    def close(self):
        """Lets another process write the run directory (its summary files closed); SIGTERM and Ctrl-C act
        as before the run."""
        for writer in getattr(self, "writers", {}).values():
            writer.close()
        if self.lock:
            self.lock.release()
        stop_polling = getattr(getattr(self, "preemption", None), "_poll_termination_signal_thread_should_stop", None)
        if stop_polling:  # Its thread polling `signalled` (a daemon; none on GCP CPU or TPU VMs) ends
            stop_polling.set()  # within its second's sleep, unwaited.
        if getattr(self, "_sigterm_before", None) is not None:
            signal.signal(signal.SIGTERM, self._sigterm_before)
            self._sigterm_before = None

    def _build(self, model_kwargs, plan):
        config = self.config
        with tower_variables(), self.strategy.scope():  # Each tower's weights on its device (model.py).
            self.model = build_alexnet(**model_kwargs, tower_devices=plan, seed=config.seed)
            self.base_lr = tf.Variable(config.learning_rate, trainable=False, name="base_lr")
            self.optimizer = PaperSGD(  # Section 5's update, the weight decay inside the momentum.
                WarmupThenPlateau(self.base_lr, config.warmup_epochs * self.steps_per_epoch),
                momentum=config.momentum, weight_decay=config.weight_decay, decay_biases=config.decay_biases)
            if config.mixed_precision == "mixed_float16":
                self.optimizer = LossScaleOptimizer(self.optimizer)  # Its overflows agreed by all replicas.
            self.optimizer.build(self.model.trainable_variables)  # Before the first step, inside the scope.
            self.state = {name: tf.Variable(value, trainable=False, name=name) for name, value in
                          [("step", tf.constant(0, tf.int64)), ("epoch", tf.constant(0, tf.int64)),
                           ("best_error", 1.0), ("bad_epochs", 0), ("lr_drops", 0), ("stuck_epochs", 0),
                           ("epoch_totals", tf.zeros(len(metrics.TOTALS), tf.float64))]}

    def _restore_or_create(self, run_config):
        config = self.config
        ckpt = checkpoint.training_checkpoint(self.model, self.optimizer, base_lr=self.base_lr, **self.state)
        self.checkpoint_dir = os.path.join(config.model_dir, checkpoint.CHECKPOINTS)
        own_dir = self.checkpoint_dir if self.chief else os.path.join(
            config.model_dir, f".worker{self.strategy.cluster_resolver.task_id}")
        if self.chief:
            checkpoint.remove_partial_saves(self.checkpoint_dir)  # Of a save that failed or was killed.
        self.checkpoint_bytes = sum(math.prod(v.shape) * tf.as_dtype(v.dtype).size
                                    for v in self.model.weights + self.optimizer.variables)
        if tf.train.get_checkpoint_state(self.checkpoint_dir):
            path, damaged = checkpoint.restore_intact(self.checkpoint_dir,
                                                      lambda path: checkpoint.restore_training(ckpt, path))
            if damaged:
                print(checkpoint.damage_report(damaged, path), flush=True)
                if self.chief:  # Before the manager (and the preemption handler) read which one is newest.
                    checkpoint.forget(self.checkpoint_dir, damaged, path)
            print(f"resumed from {path} at step {self.step}, epoch {self.epoch}", flush=True)
        elif config.init_from:  # A new run only: a resumed one has its own weights.
            loaded, skipped = weights.load_matching_weights(self.model, config.init_from)
            print(f"--init_from {config.init_from}: loaded {len(loaded)} layers; skipped {len(skipped)}: "
                  f"{', '.join(skipped) or 'none'}", flush=True)
        if self.chief and not tf.io.gfile.exists(os.path.join(config.model_dir, checkpoint.CONFIG)):
            checkpoint.write_run_files(config.model_dir, run_config, self.train_source.class_names, self.stats)
        if not self.chief and tf.io.gfile.exists(own_dir):  # A killed run's scratch: the chief's checkpoint rules.
            tf.io.gfile.rmtree(own_dir)
        self.manager = tf.train.CheckpointManager(ckpt, own_dir, max_to_keep=3)

    def _apply(self, changes):
        """A resume's changed flags (checkpoint.RESUMABLE), from this step on, recorded in config.json."""
        if "learning_rate" in [key for key, _, _ in changes]:  # Else the checkpoint's rate, plateau drops and all.
            self.base_lr.assign(self.config.learning_rate)
        for key, old, new in changes:
            print(f"resuming at step {self.step} with --{key}={new} (was {old})", flush=True)
        if self.chief:
            checkpoint.record_changes(self.config.model_dir, changes, self.step)

    @property
    def step(self):
        return int(self.state["step"].numpy())

    @property
    def epoch(self):
        return int(self.state["epoch"].numpy())

    def save(self, reason):
        with checkpoint.space_for(self.manager.directory, self.checkpoint_bytes):
            path = self.manager.save(checkpoint_number=self.state["step"])
        logging.info("saved %s (%s)", path, reason)

    def _watch_for_sigterm(self):
        """SIGTERM (and Ctrl-C) set `signalled`, which TensorFlow's handler polls each second (our
        termination_watcher_fn) and work outside the loops reads. Given none, the handler would watch
        SIGTERM itself, but on GCP's GPU VMs poll the maintenance events alone, with an hour's grace,
        and SIGTERM would end the run unsaved. On GCP's CPU and TPU VMs the handler does nothing (its
        own rule): there SIGTERM ends the process as usual. `close` undoes it."""
        self._sigterm_before = signal.getsignal(signal.SIGTERM)
        watched = self.preemption._platform_device not in (  # The platforms TensorFlow's handler ignores.
            failure_handling_util.PlatformDevice.GCE_CPU, failure_handling_util.PlatformDevice.GCE_TPU)

        def note(signum, frame):
            self.signalled.set()
            if not watched:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.raise_signal(signal.SIGTERM)

        signal.signal(signal.SIGTERM, note)

    def _fill_caches(self):
        """Decodes the splits into --cache before the first epoch; SIGTERM stops it within 64 images (the
        checkpoint is the one restored: nothing was trained since), and the run exits 0."""
        config = self.config
        splits = [self.train_source] + [self.val_source] * (config.cache == "memory")  # Validation: memory only.
        reused = config.cache != "memory" and tf.io.gfile.exists(config.cache)
        print(f"reading the images from the {config.cache} cache" if reused else
              f"first, {sum(s.num_examples for s in splits)} images are decoded into the {config.cache} cache",
              flush=True)
        try:
            for source in splits:
                data.fill_cache(source, config.cache, stop=self.signalled.is_set)
        except data.FillInterrupted as interrupted:
            kept = f"the checkpoint of step {self.step} is kept" if self.step else "no step was trained yet"
            print(f"SIGTERM: {interrupted}; {kept}. Run the same command to resume.", flush=True)
            sys.exit(self.config.preemption_exit_code)

    def _if_preempted(self):
        """After SIGTERM or Ctrl-C (to any worker), every worker saves at the same step and stops."""
        with checkpoint.space_for(self.manager.directory, self.checkpoint_bytes):
            self.preemption.save_checkpoint_if_preempted(checkpoint_number=self.step)

    def _stopped(self):
        """The PreemptionCheckpointHandler's exit, once every worker has saved at the same step."""
        if not self.chief:
            tf.io.gfile.rmtree(self.manager.directory)
        print(f"SIGTERM: stopped at step {self.step}; checkpoint saved in {self.checkpoint_dir}. "
              "Run the same command to resume.", flush=True)
        sys.exit(self.config.preemption_exit_code)

    def train_epoch(self):
        """The rest of the current epoch, in loops of --steps_per_loop steps; returns its summed totals."""
        config, epoch = self.config, self.epoch
        done = self.step - epoch * self.steps_per_epoch  # Steps of this epoch already taken.
        iterator = iter(self.strategy.distribute_datasets_from_function(
            lambda ctx: data.train_pipeline(
                self.train_source, config.batch_size, self.stats, seed=config.seed, epoch=epoch, first_step=done,
                steps=self.steps_per_epoch, pca_lighting=config.pca_lighting, cache=config.cache,
                input_context=ctx, shuffle_buffer=config.shuffle_buffer,
                service=data_service.on_service(config.data_service) if config.data_service else None,
                to_float=False)))
        self.progress = progress.Progress(f"epoch {epoch + 1}/{config.epochs}", self.steps_per_epoch, done,
                                           config.batch_size, float(self.optimizer.learning_rate),
                                           traced=self.train_loop.experimental_get_tracing_count() > 0)
        # The epoch's totals so far are checkpointed: a resumed epoch reports all of its steps.
        summed = self.state["epoch_totals"].numpy() if done else np.zeros(len(metrics.TOTALS))
        while done < self.steps_per_epoch:
            step = self.step
            steps = min(config.steps_per_loop, self.steps_per_epoch - done,
                        config.checkpoint_every - step % config.checkpoint_every)
            loop_totals = self.train_loop(iterator, tf.constant(steps)).numpy()
            summed += loop_totals
            self.state["epoch_totals"].assign(summed)
            done, step = done + steps, step + steps
            loss = metrics.errors(loop_totals)["loss"]
            if not math.isfinite(loss):
                raise TrainingStuck(f"the training loss is {loss} at step {step}: it diverged; "
                                    "lower --learning_rate or try --init=caffe")
            speed = self.progress.update(done, metrics.errors(summed))
            with self.writers["train"].as_default(step=step):
                tf.summary.scalar("loss", loss)
                tf.summary.scalar("learning_rate", float(self.optimizer.learning_rate))
                if speed:
                    tf.summary.scalar("images_per_second", speed)
            self._if_preempted()
            if step % config.checkpoint_every == 0:
                self.save("checkpoint_every")
        return summed

    def end_epoch(self, summed):
        """Validation, the learning-rate rule, summaries, a checkpoint and a history line; returns the
        validation metrics."""
        config, epoch = self.config, self.epoch
        train_metrics = metrics.errors(summed)
        if not train_metrics["images"]:
            raise preprocess.DataError(f"no image of {config.dataset} could be read in epoch {epoch + 1}")
        # SIGTERM during validation saves the epoch's training and stops; the resumed run validates it anew.
        [val_metrics] = metrics.evaluate(self.eval_step, self.val_data, progress=False, after_batch=self._if_preempted)
        learning_rate = float(self.optimizer.learning_rate)  # The epoch's last step's, before the plateau rule.
        self.state["epoch"].assign_add(1)
        if update_learning_rate(self.state, self.base_lr, val_metrics["top1_error"], config):
            print(f"validation error did not improve: learning rate now {float(self.base_lr.numpy()):g}", flush=True)
        num_classes = len(self.train_source.class_names)
        stuck = is_stuck(train_metrics["loss"], num_classes)
        self.state["stuck_epochs"].assign(self.state["stuck_epochs"] + 1 if stuck else 0)
        _write_epoch_summaries(self.writers, self.model, self.step, train_metrics, val_metrics, self.chief)
        self.save("epoch end")
        corrupt = self.steps_per_epoch * config.batch_size - train_metrics["images"]
        print(f"epoch {epoch + 1}: train loss {train_metrics['loss']:.4f} top-1 err {train_metrics['top1_error']:.2%}"
              f" | val loss {val_metrics['loss']:.4f} top-1 err {val_metrics['top1_error']:.2%} "
              f"top-5 err {val_metrics['top5_error']:.2%} | {self.progress.speed:.1f} img/s"
              + (f" | {corrupt} unreadable images skipped" if corrupt else ""), flush=True)
        if self.chief:
            with tf.io.gfile.GFile(os.path.join(config.model_dir, checkpoint.HISTORY), "a") as f:
                f.write(json.dumps({"epoch": epoch + 1, "step": self.step, "learning_rate": learning_rate,
                                    "train": train_metrics, "validation": val_metrics,
                                    "images_per_second": self.progress.speed}) + "\n")
        stuck_epochs = int(self.state["stuck_epochs"].numpy())
        warning = stuck_warning(stuck_epochs, train_metrics["loss"], num_classes)
        if warning:
            print(warning, flush=True)
        self._if_preempted()  # After the epoch's line, in the last epoch too: none is left for after the export.
        check_stuck(stuck_epochs, self.step, config)
        return val_metrics

    def finish(self):
        """Prints the final weights' digest; a worker other than the chief removes its scratch checkpoints."""
        print(f"final weights digest {weights.weights_digest(self.model)} at step {self.step}")
        if not self.chief:
            tf.io.gfile.rmtree(self.manager.directory)


def _write_epoch_summaries(writers, model, step, train_metrics, val_metrics, chief):
    with writers["train"].as_default(step=step):
        for key in ("loss", "top1_error", "top5_error"):
            tf.summary.scalar(f"epoch_{key}", train_metrics[key])
        if chief:
            for variable in model.trainable_variables:
                summaries.histogram(variable.path, variable.value, step)
            tf.summary.image("conv1_kernels", figures.kernel_grid(conv1_kernels(model), scale=2)[None])  # Figure 3.
    with writers["validation"].as_default(step=step):
        for key in ("loss", "top1_error", "top5_error"):
            tf.summary.scalar(f"epoch_{key}", val_metrics[key])

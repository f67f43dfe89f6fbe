"""The paper's update rule (section 5) as a distributed step, a loop of steps in one tf.function, and
the rules applied between epochs.

v <- 0.9 v - 0.0005 eps w - eps dL/dw; w <- w + v, with the learning rate eps divided by 10 when the
validation error stops improving, after an optional linear warm-up (not in the paper). A run whose
loss stays at chance is warned about, then stopped.
"""
import math

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from keras_alexnet import metrics


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


def update_learning_rate(state, base_lr, val_error, config):
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


class TrainingStuck(Exception):
    """Epochs at chance after enough steps, or a diverged loss: better stopped than run for 90 epochs."""


def is_stuck(loss, num_classes):
    """True when the training loss is within 2% of ln(num_classes), i.e. the net still guesses."""
    return abs(loss - math.log(num_classes)) <= 0.02 * math.log(num_classes)


def check_stuck(stuck_epochs, step, loss, num_classes, config):
    """Warns after 2 epochs at chance; stops after 3 once --stuck_steps steps are done (runs that
    learn leave chance within ~100 steps at batch 64 on ImageNette, README)."""
    if stuck_epochs >= 2:  # Epoch 1 often ends near chance on runs that then learn.
        print(f"warning: training loss {loss:.3f} is within 2% of ln({num_classes}) = "
              f"{math.log(num_classes):.3f} for {stuck_epochs} epochs: the net is not learning. Try "
              "--init=caffe, a lower --learning_rate (e.g. 0.001) or --warmup_epochs=2.")
    if stuck_epochs >= 3 and config.stuck_steps and step >= config.stuck_steps:
        raise TrainingStuck(f"stopped at step {step} after {stuck_epochs} epochs at chance; see the warning above "
                            "(--stuck_steps=0 never stops)")

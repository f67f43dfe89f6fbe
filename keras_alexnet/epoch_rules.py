"""The rules between epochs: section 5's learning-rate drops, and stopping a run that does not learn.

They change the run's state (checkpointed variables) and return what happened; the trainer prints.
`PaperPlateau` is the learning-rate rule as a callback of `model.fit`.
"""
import math

import keras
import numpy as np
import tensorflow as tf

from keras_alexnet.config import Config
from keras_alexnet.errors import UserError


def update_learning_rate(state, base_lr, val_error, config):
    """Section 5: divide the learning rate by 10 when the validation error stops improving; True when
    it did."""
    val_error = np.float32(val_error)  # As best_error holds it: an equal error is no improvement.
    if val_error < state["best_error"].numpy():
        state["best_error"].assign(val_error)
        state["bad_epochs"].assign(0)
        return False
    state["bad_epochs"].assign_add(1)
    if int(state["bad_epochs"].numpy()) >= config.lr_patience and int(state["lr_drops"].numpy()) < config.max_lr_drops:
        base_lr.assign(base_lr / 10)
        state["lr_drops"].assign_add(1)
        state["bad_epochs"].assign(0)
        return True
    return False


class PaperPlateau(keras.callbacks.Callback):
    """Section 5's learning-rate rule for `model.fit`: `update_learning_rate` after each epoch on the
    validation error 1 - logs[monitor], with the trainer's defaults (--lr_patience, --max_lr_drops).

    It divides the optimizer's learning rate, which must be a float (a variable), not a schedule.
    """

    def __init__(self, patience=Config.lr_patience, max_drops=Config.max_lr_drops, monitor="val_accuracy"):
        super().__init__()
        self.monitor, self.config = monitor, Config(lr_patience=patience, max_lr_drops=max_drops)
        self.state = {"best_error": tf.Variable(1.0), "bad_epochs": tf.Variable(0), "lr_drops": tf.Variable(0)}

    def on_train_begin(self, logs=None):
        if not isinstance(self.model.optimizer.learning_rate, keras.Variable):
            raise ValueError("PaperPlateau divides the optimizer's learning rate: give it a float, not a schedule")

    def on_epoch_end(self, epoch, logs=None):
        if self.monitor not in (logs or {}):
            raise ValueError(f"PaperPlateau needs {self.monitor} in the epoch's logs: fit with validation data "
                             "and an accuracy metric (metrics=['accuracy'])")
        learning_rate = self.model.optimizer.learning_rate
        if update_learning_rate(self.state, learning_rate, 1 - logs[self.monitor], self.config):
            print(f"epoch {epoch + 1}: validation error did not improve: learning rate now "
                  f"{float(learning_rate.numpy()):g}", flush=True)


class TrainingStuck(UserError):
    """Epochs at chance after enough steps, or a diverged loss: better stopped than run for 90 epochs."""


def is_stuck(loss, num_classes):
    """True when the training loss is within 2% of ln(num_classes), i.e. the net still guesses."""
    return abs(loss - math.log(num_classes)) <= 0.02 * math.log(num_classes)


def stuck_warning(stuck_epochs, loss, num_classes):
    """What to print after 2 epochs at chance (epoch 1 often ends near chance on runs that then learn);
    None before."""
    if stuck_epochs < 2:
        return None
    return (f"warning: training loss {loss:.3f} is within 2% of ln({num_classes}) = {math.log(num_classes):.3f} "
            f"for {stuck_epochs} epochs: the net is not learning. Try --init=caffe, a lower --learning_rate "
            "(e.g. 0.001) or --warmup_epochs=2.")


def check_stuck(stuck_epochs, step, config):
    """TrainingStuck after 3 epochs at chance once --stuck_steps steps are done (runs that learn leave
    chance within ~100 steps at batch 64 on ImageNette, BUILD.md)."""
    if stuck_epochs >= 3 and config.stuck_steps and step >= config.stuck_steps:
        raise TrainingStuck(f"stopped at step {step} after {stuck_epochs} epochs at chance; see the warning above "
                            "(--stuck_steps=0 never stops)")

"""The rules between epochs: section 5's learning-rate drops, and stopping a run that does not learn.

They change the run's state (checkpointed variables) and return what happened; the trainer prints.
"""
import math

import numpy as np


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


class TrainingStuck(Exception):
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

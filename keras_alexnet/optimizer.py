"""The optimizers of section 5's update, for the trainer and for Keras users.

`PaperSGD` is section 5's update rule; `LossScaleOptimizer` is Keras's dynamic loss scaling
(mixed_float16) made safe across replicas.
"""
import keras
import tensorflow as tf


def decayed(variable, decay_biases):
    """Section 5 decays the 'weights': a Keras variable named "bias" only with decay_biases."""
    return decay_biases or variable.name != "bias"


@keras.saving.register_keras_serializable(package="keras_alexnet")
class PaperSGD(keras.optimizers.SGD):
    """Section 5's update: v <- 0.9 v - 0.0005 eps w - eps dL/dw; w <- w + v.

    The weight decay is inside the momentum: `update_step` adds weight_decay * w to the gradient
    before Keras's momentum update. Keras's `SGD(weight_decay=...)` instead subtracts eps wd w from
    the weights outside the momentum, so with momentum 0.9 the paper's decay is ten times stronger
    in the steady state (v -> -eps wd w / (1 - 0.9)). Biases are decayed only with `decay_biases`.
    Under MirroredStrategy Keras sums the replicas' gradients before `update_step`, and a
    LossScaleOptimizer unscales them before: the decay is added once, to the unscaled sum.
    """

    def __init__(self, learning_rate=0.01, momentum=0.9, weight_decay=5e-4, decay_biases=False, **kwargs):
        super().__init__(learning_rate, momentum=momentum, **kwargs)  # Keras's own weight_decay stays None.
        self.paper_weight_decay, self.decay_biases = weight_decay, decay_biases

    def update_step(self, gradient, variable, learning_rate):
        """Keras's momentum update of dL/dw + weight_decay * w (dL/dw alone for a variable not decayed)."""
        keras_variable = self._trainable_variables[self._get_variable_index(variable)]  # Of a replica's copy too.
        if self.paper_weight_decay and decayed(keras_variable, self.decay_biases):
            decay = keras.ops.cast(self.paper_weight_decay, variable.dtype)
            gradient = keras.ops.cast(gradient, variable.dtype) + decay * variable
        super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return {**super().get_config(), "weight_decay": self.paper_weight_decay, "decay_biases": self.decay_biases}


@keras.saving.register_keras_serializable(package="keras_alexnet")
class LossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """Keras's LossScaleOptimizer whose overflow verdict all replicas agree on.

    Keras checks each replica's own gradients (before the inner optimizer sums them) and, under
    MirroredStrategy, applies the first replica's verdict to all: a float16 overflow on another
    replica alone is then applied, writes inf/NaN into every weight, and the scale is not halved.
    Here an overflow on any replica is an overflow on all, so every replica skips the step and
    halves the scale, as one device given the whole batch does.
    """

    def apply(self, grads, trainable_variables=None):
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            overflows = context.all_reduce("SUM", tf.cast(tf.logical_not(self.check_finite(grads)), tf.float32))
            # Keras reads the verdict off each replica's gradients: one NaN makes it "overflow" everywhere.
            first = next(i for i, g in enumerate(grads) if g is not None)
            grads = list(grads)
            grads[first] = grads[first] + tf.where(overflows > 0, float("nan"), 0.0)
        return super().apply(grads, trainable_variables)

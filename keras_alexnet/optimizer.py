"""The optimizers of section 5's update, for the trainer and for Keras users.

`LossScaleOptimizer` is Keras's dynamic loss scaling (mixed_float16) made safe across replicas.
"""
import keras
import tensorflow as tf


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

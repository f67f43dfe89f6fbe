"""The paper's update rule (section 5) as a distributed step, and a loop of steps in one tf.function.

v <- 0.9 v - 0.0005 eps w - eps dL/dw; w <- w + v, with the learning rate eps a variable that the
rules between epochs (epoch_rules.py) divide by 10, after an optional linear warm-up (not in the paper).
"""
import keras
import tensorflow as tf

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

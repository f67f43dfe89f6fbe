"""Section 5's training as a distributed step, and a loop of steps in one tf.function.

The update is the optimizer's (the trainer's is optimizer.PaperSGD: v <- 0.9 v - 0.0005 eps w - eps dL/dw;
w <- w + v), with the learning rate eps a variable that the rules between epochs (epoch_rules.py)
divide by 10, after an optional linear warm-up (not in the paper).
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


def make_replica_step(model, optimizer, config):
    """One replica's SGD step: (images, labels) -> its metrics.totals, not yet summed over replicas.

    The loss is averaged over the *global* batch and the optimizer sums the replicas' gradients, so
    any number of replicas computes the step of one device. The weight decay is the optimizer's
    (PaperSGD, section 5), added once to the summed (and unscaled) gradient. Gradients come from
    `tf.gradients`, which places each gradient op beside its forward op, so tower B's backward pass
    runs on tower B's device, as on the paper's second GPU. With --jit_compile the forward and
    backward pass of each replica are one XLA cluster, on one device (XLA ignores tf.device: the trainer
    refuses it for two towers on two devices).
    """
    variables = model.trainable_variables

    def forward_backward(images, labels):
        probabilities = model(images, training=True)
        totals = metrics.totals(labels, probabilities)
        loss = optimizer.scale_loss(totals[0] / config.batch_size)  # Times the scale of a LossScaleOptimizer.
        return tf.gradients(loss, [v.value for v in variables]), totals

    if config.jit_compile:
        forward_backward = tf.function(forward_backward, jit_compile=True)

    def replica_step(images, labels):
        gradients, totals = forward_backward(images, labels)
        optimizer.apply_gradients(zip(gradients, variables))
        return totals

    return replica_step


def make_train_step(strategy, model, optimizer, config):
    """One distributed step: a tf.function (images, labels) -> metrics.totals summed over replicas."""
    replica_step = make_replica_step(model, optimizer, config)

    @tf.function
    def step(images, labels):
        return strategy.reduce("SUM", strategy.run(replica_step, (images, labels)), axis=None)

    return step


def make_train_loop(strategy, replica_step, step_counter, to_network=None):
    """A tf.function (distributed iterator, n) running n steps of `replica_step` (make_replica_step's);
    returns their totals summed over the steps and the replicas.

    to_network: a replica's share of an iterator element -> (images, labels), run on the replica's device
    (data.float_images: the pipeline's uint8 crops become the network's float32 there). None: the
    elements are (images, labels).

    The host waits once per loop, not once per step (TF Model Garden's Orbit does the same), and the
    totals are summed over the replicas once per loop, not once per step: each replica keeps its own
    across the loop (across workers a reduction is a collective between hosts).
    """

    def add_step(summed, element):
        images, labels = to_network(element) if to_network else element
        return summed + replica_step(images, labels)

    @tf.function
    def loop(iterator, steps):
        summed = strategy.run(lambda: tf.zeros([len(metrics.TOTALS)]))
        for _ in tf.range(steps):
            summed = strategy.run(add_step, (summed, next(iterator)))
            step_counter.assign_add(1)
        return strategy.reduce("SUM", summed, axis=None)

    return loop

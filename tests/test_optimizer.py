"""PaperSGD, section 5's update as a Keras optimizer, and PaperPlateau, its learning-rate rule for fit."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import NARROW
from keras_alexnet import PaperPlateau, PaperSGD, distribute
from keras_alexnet.config import Config
from keras_alexnet.epoch_rules import update_learning_rate
from keras_alexnet.model import build_alexnet, tower_variables
from keras_alexnet.optimizer import LossScaleOptimizer
from keras_alexnet.step import make_train_step


def kernel_and_bias(seed=0):
    rng = np.random.default_rng(seed)
    return [keras.Variable(rng.normal(size=shape).astype("float32"), name=name)
            for shape, name in (((3, 4), "kernel"), ((4,), "bias"))]


def gradients(steps, seed=1):
    rng = np.random.default_rng(seed)
    return [[rng.normal(size=shape).astype("float32") for shape in ((3, 4), (4,))] for _ in range(steps)]


def dense_model(seed=0):
    """A softmax layer whose bias is not 0, so that its decay would show."""
    return keras.Sequential([keras.Input((6,)), keras.layers.Dense(
        5, activation="softmax", kernel_initializer=keras.initializers.RandomNormal(seed=seed),
        bias_initializer=keras.initializers.RandomNormal(seed=seed + 1))])


def dense_batches(batch_size=8, steps=3):
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(batch_size * steps, 6)).astype("float32"), rng.integers(0, 5, batch_size * steps)
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)


def max_difference(got, want):
    """max |got - want| / max |want| over variables, each against its own scale."""
    return max(np.abs(g - w).max() / np.abs(w).max() for g, w in zip(got, want))


@pytest.mark.parametrize("decay_biases", [False, True])
def test_two_steps_are_section_5s_update(decay_biases):
    """v <- 0.9 v - wd eps w - eps dL/dw; w <- w + v, in float64 numpy; a bias only with decay_biases."""
    variables = kernel_and_bias()
    optimizer = PaperSGD(0.1, weight_decay=0.05, decay_biases=decay_biases)
    w = [v.numpy().astype("float64") for v in variables]
    velocity = [np.zeros_like(x) for x in w]
    decay = [0.05, 0.05 if decay_biases else 0.0]
    for grads in gradients(2):
        optimizer.apply_gradients(zip(grads, variables))
        velocity = [0.9 * v - d * 0.1 * x - 0.1 * g for v, x, g, d in zip(velocity, w, grads, decay)]
        w = [x + v for x, v in zip(w, velocity)]
    for variable, want in zip(variables, w):
        np.testing.assert_allclose(variable.numpy(), want, rtol=1e-6, atol=1e-6, err_msg=variable.name)


def test_its_config_round_trips_and_keras_sgd_checkpoints_restore_into_it(tmp_path):
    optimizer = PaperSGD(0.1, momentum=0.8, weight_decay=0.2, decay_biases=True)
    again = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(again) is PaperSGD and again.get_config() == optimizer.get_config()
    assert (again.paper_weight_decay, again.decay_biases, again.momentum, again.weight_decay) == (0.2, True, 0.8, None)
    variables = kernel_and_bias()
    sgd = keras.optimizers.SGD(0.01, momentum=0.9)  # What the trainer built before PaperSGD.
    sgd.apply_gradients(zip(gradients(1)[0], variables))
    path = tf.train.Checkpoint(optimizer=sgd).save(str(tmp_path / "ckpt"))
    paper = PaperSGD()
    paper.build(variables)
    tf.train.Checkpoint(optimizer=paper).restore(path).assert_consumed()
    for got, want in zip(paper.momentums, sgd.momentums):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    assert int(paper.iterations.numpy()) == 1


def test_keras_decoupled_weight_decay_is_ten_times_weaker():
    """Keras's SGD(weight_decay) takes eps wd w off w outside the momentum: w shrinks by 5e-6 a step; section 5's
    decay is in v, which settles at eps wd w / (1 - 0.9), 10 times more. Here the data gradient is 0."""
    runs = {}
    for name, optimizer in [("paper", PaperSGD(0.01)),
                            ("keras", keras.optimizers.SGD(0.01, momentum=0.9, weight_decay=5e-4))]:
        weight = keras.Variable(np.ones(4, "float32"), name="kernel")
        shrink = []
        for steps in 10, 190:
            for _ in range(steps):
                optimizer.apply_gradients([(np.zeros(4, "float32"), weight)])
            shrink.append(1 - float(weight.numpy()[0]))
        runs[name] = shrink
    print("shrink of w after 10 and 200 steps:", runs)
    # 10 steps: 2.1e-4 vs 5.0e-5, 130 times the rounding of w (at most half an ulp of 1 a step).
    assert runs["paper"][0] - runs["keras"][0] > 100 * 10 * np.finfo(np.float32).eps / 2
    assert 9 < runs["paper"][1] / runs["keras"][1] < 10  # 200 steps: 10 times, but for the transient of v.


@pytest.mark.slow
def test_fit_takes_the_trainers_steps(logical_cpus):
    """3 steps of model.fit with PaperSGD are 3 steps of the trainer's make_train_step, from the same weights
    on the same batches: the same loss (the batch's mean of Keras's cross-entropy of the softmax output, which
    both compute from the softmax's logits, unclipped) and the same update, to 1e-6 of each variable's scale
    (seen: 0). A learning rate the narrow net under Glorot's fillers learns at; a weight decay large enough that
    a missing or doubled one shows (5e-6 of w a step; seen: 4e-5 after 3 steps)."""
    config = Config(batch_size=4, dropout_rate=0.0, learning_rate=1e-4, weight_decay=0.05, **NARROW)
    images = tf.random.stateless_normal([12, 227, 227, 3], [0, 7], stddev=50)
    labels = tf.constant([0, 3, 5, 9, 1, 2, 4, 6, 7, 8, 0, 1])
    batches = tf.data.Dataset.from_tensor_slices((images, labels)).batch(config.batch_size)
    strategy = distribute.mirrored_strategy(logical_cpus[:1])
    with tower_variables(), strategy.scope():
        ours = build_alexnet(10, tower_devices={logical_cpus[0]: logical_cpus[:2]}, dropout_rate=0.0,
                             init="glorot", seed=5, **NARROW)
        optimizer = PaperSGD(config.learning_rate, weight_decay=config.weight_decay)
        optimizer.build(ours.trainable_variables)
    fitted = build_alexnet(10, dropout_rate=0.0, init="glorot", seed=6, **NARROW)
    fitted.set_weights(ours.get_weights())
    before = [v.numpy() for v in ours.trainable_variables]
    step = make_train_step(strategy, ours, optimizer, config)
    loss = sum(float(step(x, y)[0]) for x, y in batches) / 12
    fitted.compile(PaperSGD(config.learning_rate, weight_decay=config.weight_decay),
                   keras.losses.SparseCategoricalCrossentropy(), jit_compile=False)
    history = fitted.fit(batches, epochs=1, shuffle=False, verbose=0)
    assert int(fitted.optimizer.iterations.numpy()) == int(optimizer.iterations.numpy()) == 3
    assert history.history["loss"][0] == pytest.approx(loss, rel=1e-6)
    got, want = [v.numpy() for v in fitted.trainable_variables], [v.numpy() for v in ours.trainable_variables]
    moved = [np.abs(b - w).max() / np.abs(w).max() for b, w in zip(before[::2], want[::2])]  # The kernels.
    print("fit against the trainer: largest difference / weight scale", max_difference(got, want),
          "; the smallest step of a kernel / its scale", min(moved))
    assert max_difference(got, want) <= 1e-6 and min(moved) > 1e-3


def test_two_replicas_decay_once(logical_cpus):
    """model.fit under a 2-replica MirroredStrategy takes the one-device steps: Keras sums the replicas'
    gradients before PaperSGD adds the decay (decayed per replica, the two-replica run would be one of twice
    the decay, far off)."""
    weights = {}
    for name, devices, decay in [("one", logical_cpus[:1], 0.05), ("two", logical_cpus[:2], 0.05),
                                 ("twice the decay", logical_cpus[:1], 0.1)]:
        with distribute.mirrored_strategy(devices).scope():
            model = dense_model()
            model.compile(PaperSGD(0.1, weight_decay=decay, decay_biases=True),
                          keras.losses.SparseCategoricalCrossentropy())
        model.fit(dense_batches(), epochs=1, shuffle=False, verbose=0)
        weights[name] = [v.numpy() for v in model.trainable_variables]
    two, twice = (max_difference(weights[name], weights["one"]) for name in ("two", "twice the decay"))
    print("2 replicas against 1:", two, "; twice the decay against once:", twice)
    assert two <= 1e-6 < 1e-3 < twice


@pytest.mark.parametrize("wrapper", [keras.optimizers.LossScaleOptimizer, LossScaleOptimizer],
                         ids=["keras", "ours"])
def test_a_loss_scale_optimizer_decays_the_unscaled_weights(wrapper):
    """Gradients of the scaled loss through a LossScaleOptimizer are the unscaled step, the decay unscaled."""
    scaled, plain = kernel_and_bias(), kernel_and_bias()
    optimizer, reference = wrapper(PaperSGD(0.1, weight_decay=0.05)), PaperSGD(0.1, weight_decay=0.05)
    optimizer.build(scaled)
    for grads in gradients(2):
        scale = float(optimizer.dynamic_scale.numpy())
        optimizer.apply_gradients(zip([g * scale for g in grads], scaled))
        reference.apply_gradients(zip(grads, plain))
    assert scale == 2.0 ** 15
    for got, want in zip(scaled, plain):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-7, err_msg=got.name)


def test_paper_plateau_drops_the_rate_as_the_trainer_does():
    """On made-up validation errors PaperPlateau divides fit's learning rate when and as the trainer's rule
    (update_learning_rate, 2 epochs of patience, 3 drops at most) divides base_lr."""
    model = dense_model()
    model.compile(PaperSGD(0.01), keras.losses.SparseCategoricalCrossentropy())
    plateau = PaperPlateau()
    plateau.set_model(model)
    plateau.on_train_begin()
    state = {name: tf.Variable(value) for name, value in [("best_error", 1.0), ("bad_epochs", 0), ("lr_drops", 0)]}
    base_lr = tf.Variable(0.01)
    errors = [0.9, 0.8, 0.85, 0.8, 0.7, 0.75, 0.75, 0.75, 0.75, 0.75, 0.75, 0.6, 0.65, 0.65]
    rates = []
    for epoch, error in enumerate(errors):
        plateau.on_epoch_end(epoch, {"val_accuracy": 1 - error})
        update_learning_rate(state, base_lr, error, Config())
        rates.append(float(model.optimizer.learning_rate.numpy()))
        assert rates[-1] == float(base_lr.numpy()), epoch
    assert rates == pytest.approx([1e-2] * 3 + [1e-3] * 3 + [1e-4] * 2 + [1e-5] * 6)
    model.compile(PaperSGD(keras.optimizers.schedules.ExponentialDecay(0.01, 10, 0.5)), "mse")
    with pytest.raises(ValueError, match="not a schedule"):
        plateau.on_train_begin()


def test_paper_plateau_in_fit():
    """A net that does not learn (learning rate 1e-9) on validation examples it gets all right: epoch 1 improves
    on the error of 1, epochs 2 and 3 do not: the rate is 1e-10 from then on."""
    model = dense_model()
    x = np.random.default_rng(3).normal(size=(16, 6)).astype("float32")
    y = model.predict(x, verbose=0).argmax(-1)
    model.compile(PaperSGD(1e-9), keras.losses.SparseCategoricalCrossentropy(), metrics=["accuracy"])
    history = model.fit(x, y, batch_size=8, epochs=3, validation_data=(x, y), callbacks=[PaperPlateau()], verbose=0)
    assert history.history["val_accuracy"] == [1.0] * 3
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(1e-10)

"""The paper's network (section 3, Figure 2) as a functional Keras model of two towers.

The input is 227 x 227 x 3, not the 224 the paper's text says: an 11 x 11 kernel at stride 4 needs
(227 - 11) / 4 + 1 = 55 to give the paper's 55 x 55 conv1 maps (Caffe's bvlc_alexnet uses 227 too).

Tower A and tower B each hold half of every layer, as the paper's two GPUs did. They exchange
activations only where the paper's GPUs communicated: conv3, fc6 and fc7 see both towers' outputs,
every other layer sees its own tower only. fc8 and the softmax run on tower A's device.

Each tower's weights, and their momentum, live on the tower's device too: section 3.2's GPUs each
held half of the kernels. Inside a MirroredStrategy that takes `tower_variables()`, entered before
the strategy's scope. The strategy makes a variable's copy for each replica under that replica's
device scope, calling the variable creators entered before its scope from inside that one: there the
creator moves the copy of an OnTower layer's variable to its tower's device for that replica. Keras's
TensorFlow optimizer makes each slot colocated with its variable (`colocate_vars_with`), so the
momentum follows. A creator was chosen over tower-local variables: the variables stay the strategy's
own MirroredVariables, so the all-reduce, the update on each copy's device, checkpoints and
MultiWorkerMirroredStrategy's broadcast of the initial values work unchanged.
"""
import contextlib
import contextvars
import itertools

import keras
import tensorflow as tf
from keras import layers
from tensorflow.python.distribute import device_util  # The device a MirroredStrategy makes a copy on.

from keras_alexnet.errors import UserError
from keras_alexnet.lrn import LocalResponseNormalization, TowerLocalResponseNormalization

INPUT_SHAPE = (227, 227, 3)
TOWERS = ("_a", "_b")
# Section 3.2's one-GPU net (build_alexnet(towers=1, halved=ONE_GPU)): half the kernels of the two-GPU net in
# conv1-4; footnote 2: not in conv5 nor the fully-connected layers, so both nets have about as many parameters.
ONE_GPU = ["conv1", "conv2", "conv3", "conv4"]  # A list, as config.json gives it back (a resume compares them).

# Section 5: "We initialized the weights in each layer from a zero-mean Gaussian distribution with
# standard deviation 0.01. We initialized the neuron biases in the second, fourth, and fifth
# convolutional layers, as well as in the fully-connected hidden layers, with the constant 1 ...
# the remaining layers with the constant 0." Caffe's bvlc_alexnet uses std 0.005 for fc6/fc7 and
# biases 0.1 instead of 1; "glorot" is Keras's default (Glorot-uniform weights, zero biases).
INITS = {
    "paper": {"std": {}, "bias": {"conv2": 1.0, "conv4": 1.0, "conv5": 1.0, "fc6": 1.0, "fc7": 1.0}},
    "caffe": {"std": {"fc6": 0.005, "fc7": 0.005},
              "bias": {"conv2": 0.1, "conv4": 0.1, "conv5": 0.1, "fc6": 0.1, "fc7": 0.1}},
    "glorot": None,
}


def local_name(device):
    """"TYPE:index" of a device string, so that "/device:CPU:0" and "/job:w/task:1/device:CPU:0" agree."""
    spec = tf.DeviceSpec.from_string(device)
    return f"{spec.device_type}:{spec.device_index}"


# Whether tower_variables() is entered; the (tower_devices, tower) of the OnTower layer being built;
# whether towers_unplaced() is entered.
_PLACING = contextvars.ContextVar("placing", default=False)
_BUILDING = contextvars.ContextVar("building", default=None)
_UNPLACED = contextvars.ContextVar("unplaced", default=False)


@contextlib.contextmanager
def _set(variable, value):
    """`variable` (a ContextVar) is `value` for the block."""
    token = variable.set(value)
    try:
        yield
    finally:
        variable.reset(token)


def _pair(plan, device):
    """The (tower A, tower B) devices that `plan` gives the replica on `device`, or None."""
    return {local_name(k): v for k, v in plan.items()}.get(local_name(device))


def tower_device(tower_devices, tower):
    """The device string of `tower` (0 = A, 1 = B) under `tower_devices`, or None for no placement.

    `tower_devices` is None (let TensorFlow place), a pair of devices, or a plan that maps each
    MirroredStrategy replica device to its pair; the plan is looked up from the replica context
    at call time, so one model serves every replica of a data-parallel run.
    """
    if not tower_devices:
        return None
    if isinstance(tower_devices, dict):
        context = tf.distribute.get_replica_context()
        if context is None:  # Cross-replica context (strategy.scope()): tower_variables places variables.
            return None
        replica = tf.get_static_value(context.replica_id_in_sync_group) or 0  # Outside a strategy: 0.
        devices = context.strategy.extended.worker_devices if tf.distribute.has_strategy() else ()
        # This worker's replica devices; MultiWorkerMirroredStrategy numbers its replicas across workers.
        pair = _pair(tower_devices, devices[replica % len(devices)]) if devices else None
        if pair is None:  # By replica number: the first pair outside a strategy.
            pair = list(tower_devices.values())[replica % len(tower_devices)]
        return pair[tower]
    return tower_devices[tower]


@contextlib.contextmanager
def tower_variables():
    """Puts each tower's variables, and the optimizer slots made from them, on its tower's device in
    every replica (the module's docstring says how). Enter it before the strategy's scope:

        with tower_variables(), strategy.scope():
            model = build_alexnet(tower_devices=plan)
            optimizer.build(model.trainable_variables)
    """
    def creator(next_creator, **kwargs):
        building = _BUILDING.get()
        if building is None:  # Not an OnTower layer's variable: the replica's device.
            return next_creator(**kwargs)
        tower_devices, tower = building
        replica = device_util.current()  # The strategy's device scope for this copy.
        pair = _pair(tower_devices, replica) if isinstance(tower_devices, dict) else tower_devices
        if pair is None:
            raise ValueError(f"no tower devices for a variable made on {replica!r}: enter tower_variables() "
                             "before strategy.scope(), with a plan naming each replica's device")
        with tf.device(pair[tower]):
            return next_creator(**kwargs)

    with _set(_PLACING, True), tf.variable_creator_scope(creator):
        yield


def towers_unplaced():
    """Model calls inside run, and are traced, without the towers' device scopes: an export's functions,
    which the loading process places (a strict loader refuses pinned devices, and a server's request
    would run on two GPUs)."""
    return _set(_UNPLACED, True)


def default_tower_devices():
    """Two GPUs -> GPU:0 and GPU:1, as in the paper; otherwise both towers on the one device there is."""
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) >= 2:
        return (gpus[0].name, gpus[1].name)
    return None


@keras.saving.register_keras_serializable(package="keras_alexnet")
class OnTower(keras.layers.Wrapper):
    """Runs the wrapped layer, and builds its variables, under its tower's `tf.device` scope (in a
    strategy's scope, `tower_variables` places the variables).

    A `tf.device` scope around a layer call while a functional model is built is not replayed when
    the model runs, so the scope is entered here, in `build` and in `call`, every time the model runs.
    """

    def __init__(self, layer, tower, tower_devices=None, **kwargs):
        kwargs.setdefault("name", layer.name)
        super().__init__(layer, **kwargs)
        self.tower = int(tower)
        self.tower_devices = tower_devices
        # XLA ignores tf.device (tensorflow/tensorflow#124880): Keras's fit(jit_compile="auto") must not
        # merge placed towers onto one device.
        self.supports_jit = not tower_devices

    def _scope(self):
        """The tower's device scope; none for an unplaced tower: `tf.device(None)` would clear the scope of
        the MirroredStrategy replica it runs in, and put every replica on the default device."""
        device = None if _UNPLACED.get() else tower_device(self.tower_devices, self.tower)
        return contextlib.nullcontext() if device is None else tf.device(device)

    def build(self, input_shape):
        if not self.layer.built:  # A deserialized inner layer arrives built.
            placed = bool(self.tower_devices) and tf.distribute.has_strategy() and \
                tf.distribute.in_cross_replica_context()
            if placed and not _PLACING.get():  # The strategy would put every tower on the replica's device.
                raise ValueError("build a model with tower devices in a strategy's scope inside "
                                 "keras_alexnet.model.tower_variables(), entered before strategy.scope()")
            with _set(_BUILDING, (self.tower_devices, self.tower) if placed else None), self._scope():
                self.layer.build(input_shape)
        self.built = True

    def call(self, inputs, training=None):
        with self._scope():
            if self.layer._call_has_training_arg:
                return self.layer(inputs, training=training)
            return self.layer(inputs)

    def compute_output_shape(self, input_shape):
        return self.layer.compute_output_shape(input_shape)

    def get_config(self):
        return {**super().get_config(), "tower": self.tower, "tower_devices": self.tower_devices}


@keras.saving.register_keras_serializable(package="keras_alexnet")
class ReplicaDropout(layers.Dropout):
    """Section 4.2's dropout with its own mask on every data-parallel replica.

    Keras draws masks from a seed generator whose state the replicas share (a mirrored variable), so
    every replica would drop the same units; the replica's index is folded into each draw's seed.
    Still reproducible from the seed, and inverted (outputs scaled by 1 / (1 - rate) in training).
    """

    def call(self, inputs, training=False):
        if not training or self.rate == 0:
            return inputs
        context = tf.distribute.get_replica_context()
        replica = context.replica_id_in_sync_group if context else 0
        seed = tf.random.experimental.stateless_fold_in(tf.cast(self.seed_generator.next(), tf.int64), replica)
        return tf.nn.experimental.stateless_dropout(inputs, self.rate, seed)


def _initializers(init, name, seed):
    """(kernel, bias) initializers of layer `name` ("conv1", ..., "fc8") under scheme `init`."""
    if init not in INITS:
        raise UserError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    scheme = INITS[init]
    if scheme is None:
        return keras.initializers.GlorotUniform(seed=seed), keras.initializers.Zeros()
    std = scheme["std"].get(name, 0.01)
    return (keras.initializers.RandomNormal(stddev=std, seed=seed),
            keras.initializers.Constant(scheme["bias"].get(name, 0.0)))


def build_alexnet(num_classes=1000, tower_devices=None, dropout_rate=0.5, init="paper",
                  seed=None, lrn=True, pool_size=3, pool_stride=2, towers=2, lrn_bias=2.0, lrn_alpha=1e-4,
                  lrn_across_towers=False, width=1.0, halved=(), without=(), name="alexnet"):
    """Builds AlexNet (Figure 2 of the paper): input 227x227x3 mean-subtracted RGB, softmax output.

    Args:
      num_classes: width of fc8 (1000 for ILSVRC).
      tower_devices: None (TensorFlow places; with two GPUs and no tf.distribute strategy, GPU:0 and
        GPU:1), a pair of device strings for towers A and B, or a dict mapping each replica device
        to such a pair (in a strategy's scope, inside tower_variables()).
      dropout_rate: dropout after fc6 and fc7 (section 4.2; 0 disables it).
      init: "paper" (section 5), "caffe" (bvlc_alexnet's fillers) or "glorot" (Keras default).
      seed: makes the initial weights and the dropout masks reproducible.
      lrn: False removes both LRN layers (the section 3.3 ablation).
      pool_size, pool_stride: 3 and 2 overlap as in section 3.4; 2 and 2 is the non-overlapping ablation.
      towers: 2 for the paper's two towers, 1 for a single tower of the same total width.
      halved: with towers=1, layers of one tower's kernels (half the net's): ONE_GPU is section 3.2's one-GPU net.
      without: middle convolutional layers removed, of conv3 and conv4 (section 6's depth claim). The next
        layer takes the removed one's input, with its connectivity, and keeps its own number of kernels:
        without conv3, conv4 sees both towers' pool2 maps (256 in the paper's net); without conv4, conv5
        sees its tower's conv3 maps (192).
      lrn_bias, lrn_alpha: the LRN's k and alpha (section 3.3: 2 and 1e-4, alpha per squared term).
        Caffe's bvlc_alexnet has k = 1 and alpha = 1e-4 divided by n = 5: lrn_bias=1, lrn_alpha=2e-5.
      lrn_across_towers: LRN windows cross the split between the towers, as Caffe's (one stack of 96
        and 256 maps); the paper's GPUs normalise their own maps (False).
      width: scales every layer's kernels and units (1: the paper's; 1/16 gives a net of the same
        shape for tests and quick experiments).
    """
    if towers not in (1, 2):
        raise UserError(f"towers must be 1 or 2, got {towers}")
    if halved and towers == 2:
        raise UserError(f"halved {list(halved)} needs towers=1: the two towers already hold half the kernels each")
    if set(without) - {"conv3", "conv4"}:
        raise UserError(f"without may name conv3 and conv4, not {sorted(set(without) - {'conv3', 'conv4'})}")
    if tower_devices is None and not tf.distribute.has_strategy():  # A strategy's replicas take the devices.
        tower_devices = default_tower_devices()
    if isinstance(tower_devices, (list, tuple)):
        tower_devices = list(tower_devices)
    if not width > 0:
        raise UserError(f"width must be positive, got {width}")
    halves = 2 // towers  # A single tower holds both halves of every layer.

    def scaled(units, name):
        return max(1, round(units * width)) * (1 if name in halved else halves)
    suffixes = TOWERS[:towers] if towers == 2 else ("",)
    layer_index = itertools.count()

    def next_seed():  # One distinct seed per initializer and dropout layer.
        return None if seed is None else seed + next(layer_index)

    def on(tower, layer):
        return OnTower(layer, tower, tower_devices)

    def conv(name, filters, kernel, tower, suffix, strides=1, padding="same"):
        kernel_init, bias_init = _initializers(init, name, next_seed())
        return on(tower, layers.Conv2D(
            scaled(filters, name), kernel, strides=strides, padding=padding, activation="relu",
            kernel_initializer=kernel_init, bias_initializer=bias_init, name=f"{name}{suffix}"))

    def dense(name, units, tower, suffix, activation="relu"):
        kernel_init, bias_init = _initializers(init, name, next_seed())
        return on(tower, layers.Dense(
            units if name == "fc8" else scaled(units, name), activation=activation, kernel_initializer=kernel_init,
            bias_initializer=bias_init, name=f"{name}{suffix}"))

    def pool(name, tower):
        return on(tower, layers.MaxPooling2D(pool_size, pool_stride, name=name))

    def merge(inputs, name, tower):
        return inputs[0] if len(inputs) == 1 else on(tower, layers.Concatenate(name=name))(inputs)

    def dropout(name, tower):
        return on(tower, ReplicaDropout(dropout_rate, seed=next_seed(), name=name))

    def normalise(name, maps, t, s):
        if not lrn:
            return maps[s]
        kwargs = {"bias": lrn_bias, "alpha": lrn_alpha, "name": f"{name}{s}"}
        if lrn_across_towers and towers == 2:
            return on(t, TowerLocalResponseNormalization(t, **kwargs))([maps[u] for u in suffixes])
        return on(t, LocalResponseNormalization(**kwargs))(maps[s])

    images = keras.Input(INPUT_SHAPE, name="images")
    # Layers 1-2: each tower sees only its own maps. Made tower by tower, so a seed gives the same weights
    # whatever the order of the calls below.
    convs = {s: (conv("conv1", 48, 11, t, s, strides=4, padding="valid"), conv("conv2", 128, 5, t, s))
             for t, s in enumerate(suffixes)}
    x = {s: convs[s][0](images) for s in suffixes}
    x = {s: pool(f"pool1{s}", t)(normalise("lrn1", x, t, s)) for t, s in enumerate(suffixes)}
    x = {s: convs[s][1](x[s]) for s in suffixes}
    x = {s: pool(f"pool2{s}", t)(normalise("lrn2", x, t, s)) for t, s in enumerate(suffixes)}
    both = [x[s] for s in suffixes]
    for t, s in enumerate(suffixes):  # conv3 takes both towers' maps; conv4-5 their own.
        h = merge(both, f"conv3_in{s}", t)
        for layer, filters in [("conv3", 192), ("conv4", 192), ("conv5", 128)]:
            h = h if layer in without else conv(layer, filters, 3, t, s)(h)
        h = pool(f"pool5{s}", t)(h)
        x[s] = on(t, layers.Flatten(name=f"flatten{s}"))(h)
    for fc in ("fc6", "fc7"):  # Fully connected layers take both towers' outputs.
        both = [x[s] for s in suffixes]
        for t, s in enumerate(suffixes):
            h = dense(fc, 2048, t, s)(merge(both, f"{fc}_in{s}", t))
            x[s] = h if fc == "fc7" else dropout(f"dropout6{s}", t)(h)
    fc7 = on(0, layers.Concatenate(name="fc7"))([x[s] for s in suffixes]) if towers == 2 else x[""]
    h = dropout("dropout7", 0)(fc7)
    logits = dense("fc8", num_classes, 0, "", activation=None)(h)
    probabilities = on(0, layers.Activation("softmax", dtype="float32", name="probabilities"))(logits)
    return keras.Model(images, probabilities, name=name)


def feature_model(model, layer="fc7"):
    """The sub-model from the images to a named layer's output (fc7: section 6.1's features)."""
    return keras.Model(model.input, model.get_layer(layer).output, name=f"{model.name}_{layer}")


def conv1_kernels(model):
    """(tower A, tower B) conv1 kernels of a build_alexnet model, each [11, 11, 3, 48]; of a one-tower
    model, its one [11, 11, 3, 96] kernel."""
    names = [f"conv1{s}" for s in TOWERS] if "conv1_a" in [layer.name for layer in model.layers] else ["conv1"]
    return tuple(model.get_layer(name).layer.kernel.numpy() for name in names)

"""The configuration of a training run: one dataclass whose fields are the command-line flags.

Section 5's recipe is every default but one (`init`, see Config). `paper`, `demo` and `imagenette` are
presets (--preset); ablate, bench and the tests build a Config directly; `python -m keras_alexnet.train`
builds it from its flags over a preset.
"""
import dataclasses
import math
import re
import typing

import tensorflow as tf
from absl import flags

from keras_alexnet.errors import UserError

FLAGS = flags.FLAGS
ADDRESS = re.compile(r"(grpc://)?[\w.-]+:\d{1,5}")


def check_address(address, flag="--data_service"):
    """`address` (HOST:PORT, grpc:// optional) or a UserError naming `flag`."""
    if not ADDRESS.fullmatch(address) or int(address.rsplit(":", 1)[1]) > 65535:
        raise UserError(f"{flag} must be HOST:PORT or grpc://HOST:PORT (a port up to 65535), got {address!r}")
    return address


def option(default, help, choices=None):
    """A Config field that is also a command-line flag."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


@dataclasses.dataclass
class Config:
    """Everything a run depends on: one flag per field, written to config.json beside the checkpoints.

    Section 5's recipe is the default, except `init`: the paper's biases of 1 leave small datasets at
    chance (docs/training.md, "Defaults that learn"), so Caffe's fillers are; --init=paper restores it.
    """
    dataset: str = option("synthetic", "'synthetic' (built-in, offline), a folder of class folders, "
                          "or a TFDS name such as imagenet2012 or imagenette/320px-v2.")
    data_dir: str | None = option(None, "TFDS data directory (manual_dir for imagenet2012 lives below it).")
    model_dir: str = option("runs/alexnet", "Checkpoints, TensorBoard logs, labels.txt, config.json.")
    batch_size: int = option(128, "Global batch size (section 5: 128).")
    epochs: int = option(90, "Epochs to train (section 5: roughly 90).")
    steps_per_epoch: int | None = option(None, "Cap on steps per epoch; default: one pass over the split.")
    eval_steps: int | None = option(None, "Cap on validation batches per epoch; default: the whole split.")
    learning_rate: float = option(0.01, "Initial learning rate epsilon (section 5: 0.01).")
    momentum: float = option(0.9, "Momentum (section 5: 0.9).")
    weight_decay: float = option(5e-4, "L2 weight decay inside the momentum update (section 5: 0.0005).")
    decay_biases: bool = option(False, "Apply weight decay to biases too (section 5 says 'weights').")
    warmup_epochs: int = option(0, "Linear learning-rate warm-up over this many epochs (not in the paper).")
    lr_patience: int = option(2, "Epochs without a better validation error before lr /= 10 (the paper "
                              "gives no number).")
    max_lr_drops: int = option(3, "How often the learning rate may be divided by 10 (section 5: 3).")
    init: str = option("caffe", "Initialisation: paper (section 5), caffe (bvlc_alexnet), glorot.",
                       ["paper", "caffe", "glorot"])  # model.INITS's keys.
    dropout_rate: float = option(0.5, "Dropout after fc6 and fc7 (section 4.2).")
    towers_per_replica: int = option(2, "2: the paper's two towers on two devices per replica; 1: every "
                                     "device is a replica running both towers.")
    cpu_devices: int = option(0, "Split the CPU into this many logical devices (0: leave it).")
    cluster: str = option("auto", "The workers: auto (TF_CONFIG's when it is set, as Kubeflow's TFJob sets it, "
                          "else this process alone) or slurm (the tasks of the srun step).", ["auto", "slurm"])
    cluster_port: int = option(8888, "--cluster=slurm: the port of a node's first task (its k-th takes this + k).")
    mixed_precision: str = option("off", "Keras mixed-precision policy (mixed_float16 adds loss scaling).",
                                  ["off", "mixed_float16", "mixed_bfloat16"])
    jit_compile: bool = option(False, "Compile each replica's forward and backward pass with XLA, on one device: "
                               "with one device a replica (--towers_per_replica=1, or a single device).")
    seed: int = option(0, "Seed of the initial weights, dropout and augmentation.")
    deterministic: bool = option(False, "Deterministic kernels: a resumed run ends as an uninterrupted one.")
    preemption_exit_code: int = option(0, "Exit status after SIGTERM's checkpoint: e.g. 143 (128 + SIGTERM) for a "
                                       "launcher that restarts on it, as Kubeflow's restartPolicy ExitCode on 128-255.")
    checkpoint_every: int = option(500, "Save a checkpoint every this many steps (and at each epoch end).")
    steps_per_loop: int = option(10, "Steps run inside one tf.function before the host reads the metrics, "
                                 "updates the progress and checks for SIGTERM (as TF Model Garden's Orbit).")
    stuck_steps: int = option(300, "A run whose training loss stays at chance for 3 epochs is stopped once "
                              "it has taken this many steps (0: never stop it).")
    stats: str | None = option(None, ".npz from keras_alexnet.stats; default: ImageNet's means and eigen "
                               "figures.")
    pca_lighting: bool = option(True, "Fancy-PCA lighting augmentation (section 4.1).")
    shuffle_buffer: int = option(2048, "Records in the shuffle buffer of a source read in order (TFDS); "
                                 "folders and synthetic draw each epoch as a permutation of the split.")
    cache: str | None = option(None, "Decode the 256x256 images once: 'memory', or an .npy file path (192 KiB an "
                               "image; a complete file is reused, one left half-filled by a kill is refilled).")
    data_service: str = option("", "grpc://HOST:PORT of a tf.data service dispatcher (python -m "
                               "keras_alexnet.data_service): its workers decode and augment the training images, "
                               "the local run's batches in its order; a folder of images or synthetic only.")
    export_dir: str | None = option(None, "Export a SavedModel to EXPORT_DIR/<step>/ when training ends "
                                "(python -m keras_alexnet.train).")
    init_from: str | None = option(None, "Start from the weights of this run directory (e.g. a converted "
                                   "bvlc_alexnet), every layer whose name and shape match; others start anew.")
    width: float = option(1.0, "Scale every layer's kernels and units (1: the paper's net; 1/16: one of the same "
                          "shape, ~250x smaller, for quick runs and tests).")
    model: dict = dataclasses.field(default_factory=dict)  # Extra build_alexnet arguments (ablations).

    def validate(self):
        """Refuses, before anything is written, a setting no run can use (one line naming it)."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"--{field.name} must be a finite number, got {value}")
        if not self.model_dir.strip():
            raise UserError("--model_dir must not be empty: name the run's directory")
        positive = ["batch_size", "epochs", "learning_rate", "checkpoint_every", "shuffle_buffer", "steps_per_loop",
                    "width", "cluster_port"]
        for name in positive:
            if not getattr(self, name) > 0:
                raise UserError(f"--{name} must be positive, got {getattr(self, name)}")
        for name in ["steps_per_epoch", "eval_steps"]:
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise UserError(f"--{name} must be positive, got {getattr(self, name)}")
        for name in ["weight_decay", "warmup_epochs", "lr_patience", "max_lr_drops", "cpu_devices", "stuck_steps"]:
            if getattr(self, name) < 0:
                raise UserError(f"--{name} must not be negative, got {getattr(self, name)}")
        if not 0 <= self.preemption_exit_code <= 255:
            raise UserError(f"--preemption_exit_code must be in [0, 255], got {self.preemption_exit_code}")
        if not 0 <= self.momentum < 1:
            raise UserError(f"--momentum must be in [0, 1), got {self.momentum}")
        if not 0 <= self.dropout_rate < 1:
            raise UserError(f"--dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if self.towers_per_replica not in (1, 2):
            raise UserError(f"--towers_per_replica must be 1 or 2, got {self.towers_per_replica}")
        if self.deterministic and self.jit_compile:
            raise UserError("--deterministic with --jit_compile: XLA has no deterministic max-pooling gradient "
                            "(tensorflow/tensorflow#69417); drop one of them")
        if self.cache and self.cache != "memory" and not self.cache.lower().endswith(".npy"):
            raise UserError(f"--cache must be 'memory' or an .npy file path, got {self.cache!r} (leave it out for "
                            "no cache)")
        if self.data_service:
            check_address(self.data_service)
            if self.cache:
                raise UserError("--cache with --data_service: the service's workers decode the images, not this "
                                "process; drop one of them")
        if self.stats and not tf.io.gfile.exists(self.stats):
            raise UserError(f"--stats file {self.stats} does not exist")
        return self


def paper():
    """Section 5's recipe (Config's defaults): 90 epochs of batch 128 on the default dataset."""
    return Config()


def demo():
    """`make train`: 3 epochs of 32 steps of 32 synthetic images (a new draw from the 2,560 each epoch)
    and 256 validation images an epoch, decoded once into memory: 3,840 images in all, minutes on a
    2-core laptop; then a SavedModel in export/alexnet."""
    return Config(dataset="synthetic", model_dir="runs/demo", epochs=3, steps_per_epoch=32, eval_steps=8,
                  batch_size=32, cache="memory", export_dir="export/alexnet")


def imagenette():
    """The 10-class ImageNette subset beside the repository (3,000 training, 1,000 validation images),
    12 epochs of batch 64 held in memory: BUILD.md's reference run on 2 cores."""
    return Config(dataset="../shared/data/imagenette2_224_subset", model_dir="runs/imagenette", batch_size=64,
                  epochs=12, cache="memory")


PRESETS = {"paper": paper, "demo": demo, "imagenette": imagenette}


def define_flags(names=None):
    """One absl flag per Config field (or per field of `names`), with its default and help, and --preset."""
    flags.DEFINE_enum("preset", "paper", list(PRESETS), "Start from these settings; flags given override them: "
                      "paper (section 5), demo (make train), imagenette (the shared subset).")
    define = {str: flags.DEFINE_string, int: flags.DEFINE_integer, float: flags.DEFINE_float,
              bool: flags.DEFINE_boolean}
    for field in dataclasses.fields(Config):
        if "help" not in field.metadata or names and field.name not in names:
            continue
        kind = next(t for t in typing.get_args(field.type) or (field.type,) if t is not type(None))
        if field.metadata["choices"]:
            flags.DEFINE_enum(field.name, field.default, field.metadata["choices"], field.metadata["help"])
        else:
            define[kind](field.name, field.default, field.metadata["help"])


def config_from_flags():
    """The --preset's Config with every flag given on the command line in place of its value."""
    given = {f.name: getattr(FLAGS, f.name) for f in dataclasses.fields(Config)
             if f.name in FLAGS and FLAGS[f.name].present}
    return dataclasses.replace(PRESETS[FLAGS.preset](), **given).validate()

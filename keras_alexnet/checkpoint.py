"""What a training run keeps in its --model_dir (weights.py brings a model back from it).

    model_dir/
      config.json     the flags of the run and `model`: the build_alexnet arguments
      labels.txt      class names, one a line, in label order
      stats.npz       the data statistics the run subtracted (mean image, RGB eigen figures)
      checkpoints/    tf.train.CheckpointManager checkpoints: model, optimizer, step, loop state
      history.jsonl   one JSON line per epoch: train and validation metrics, images/s

A run directory knows what it is: a resumed run must compute what it was created to compute (data,
classes, batch, seed, update rule, augmentation, network: `check_resume`); the flags a resume may
change (epochs, learning rate, ...) are recorded in config.json with the step they took effect at.
labels.txt and stats.npz are written once, when the run is created.
"""
import collections
import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket

import tensorflow as tf

from keras_alexnet.cli import one_line
from keras_alexnet.errors import UserError
from keras_alexnet.files import write_file

CONFIG, LABELS, STATS, CHECKPOINTS = "config.json", "labels.txt", "stats.npz", "checkpoints"
HISTORY, LOCK = "history.jsonl", ".lock"


class RunLock:
    """One process at a time writes a run directory: an exclusive POSIX lock on MODEL_DIR/.lock, which
    the OS drops when its process ends, by kill -9 too (a stale lock is no lock). The file names the
    holder, for the refusal of the next process. Local directories only: GCS has no locks."""

    def __init__(self, model_dir):
        self.fd = None
        if "://" in model_dir:
            return
        tf.io.gfile.makedirs(model_dir)  # Its error names a file where a folder belongs.
        fd = os.open(os.path.join(model_dir, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):  # No POSIX locks there (some NFS, FUSE).
                os.close(fd)
                raise OSError(f"cannot lock {model_dir}/{LOCK}: {error.strerror}") from None
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{model_dir} is in use by {holder}: one process at a time writes a run "
                             "(wait for it to end, or stop it)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd

    def release(self):
        if self.fd is not None:
            os.close(self.fd)  # Closing drops the lock.
            self.fd = None


RunFiles = collections.namedtuple("RunFiles", ["config", "class_names", "stats_path"])


def write_labels(path, class_names):
    write_file(path, "".join(f"{name}\n" for name in class_names))


def read_labels(path):
    with tf.io.gfile.GFile(path) as f:
        return [line.rstrip("\n") for line in f if line.strip()]


# Flags a resume may change: they take effect from the step it resumes at, and config.json records
# each change in "changes". Every other value of config.json is what the run computes (its data, seed,
# update rule, augmentation, network): a resume with another one is refused (README, "Resuming").
RESUMABLE = ("model_dir", "epochs", "learning_rate", "checkpoint_every", "steps_per_loop", "eval_steps",
             "lr_patience", "max_lr_drops", "stuck_steps", "export_dir", "cache", "data_dir", "cpu_devices",
             "towers_per_replica", "jit_compile", "deterministic", "cluster", "cluster_port",
             "preemption_exit_code", "data_service")
NAMES = {"steps_per_epoch": "steps per epoch", "input_shape": "input size", "model": "network"}


def check_resume(model_dir, config, class_names):
    """The changes [(key, run's value, new value)] of RESUMABLE flags that `config` (as written by the
    trainer) makes to the run in `model_dir`; a UserError naming both values where it changes
    anything else, or the class names. [] for a new run."""
    if not tf.io.gfile.exists(os.path.join(model_dir, CONFIG)):
        return []
    run = read_run_files(model_dir)
    changes = []
    for key in [key for key in config if key != "model"] + ["classes", "model"]:  # The network by its classes.
        if key == "classes" and run.class_names != list(class_names):
            differ = sorted(set(run.class_names) ^ set(class_names)) or ["the same names in another order"]
            raise UserError(f"{model_dir} was trained on other classes than this dataset's "
                             f"({', '.join(differ)}): use a new --model_dir")
        if key not in run.config or run.config[key] == config[key]:
            continue
        if key not in RESUMABLE:
            raise UserError(f"{model_dir} was trained with {NAMES.get(key, '--' + key)} {run.config[key]}, not "
                             f"{config[key]}: resume with the same value, or use a new --model_dir")
        changes.append((key, run.config[key], config[key]))
    return changes


def record_changes(model_dir, changes, step):
    """Writes the new values of `changes` (check_resume's) into config.json, each also listed under
    "changes" with the step it took effect at."""
    run = read_run_files(model_dir).config
    run.update({key: new for key, _, new in changes})
    run["changes"] = run.get("changes", []) + [{"step": step, "flag": key, "was": old, "now": new}
                                                for key, old, new in changes]
    _write_json(os.path.join(model_dir, CONFIG), run)


def training_checkpoint(model, optimizer, **state):
    """The tf.train.Checkpoint of a training run: the one place that names its keys."""
    return tf.train.Checkpoint(model=model, optimizer=optimizer,
                               dropout_rng=[v.value for v in model.non_trainable_variables], **state)


def restore_training(ckpt, path):
    """Restores every value of a training checkpoint. One that lacks a value this version keeps (written
    by an older keras_alexnet) is refused in one line: resuming without it would not be exact."""
    try:
        ckpt.restore(path).assert_existing_objects_matched()
    except AssertionError as error:
        names = re.findall(r"tf\.Variable '([^':]+)", str(error))
        missing = sorted({re.sub(r"/replica_\d+$", "", name) for name in names}) or ["some values"]
        raise UserError(f"{path} was written by another version of keras_alexnet: it lacks {', '.join(missing)}; "
                         "train in a new --model_dir, or start one from its weights with --init_from") from None


def restore_intact(directory, restore, step=None):
    """Calls `restore(path)` on the newest checkpoint in `directory` (or the one of `step`), then on older
    ones while it finds them damaged (cut short, without its .index, bytes overwritten): returns (the path
    restored, [(damaged path, why)], newest first). FileNotFoundError when there is none to restore."""
    state = tf.train.get_checkpoint_state(directory)
    paths = list(reversed(state.all_model_checkpoint_paths)) if state else []
    if step is not None:
        chosen = [path for path in paths if path.endswith(f"-{step}")]
        if not chosen:
            steps = ", ".join(sorted((path.rsplit("-", 1)[1] for path in paths), key=int)) or "none"
            raise FileNotFoundError(f"{directory} has no checkpoint of step {step} (it has: {steps})")
        paths = chosen
    damaged = []
    for path in paths:
        try:
            restore(path)
            return path, damaged
        except (tf.errors.OpError, IndexError) as error:  # Reading a cut file raises IndexError.
            damaged.append((path, one_line(error)))
        except ValueError as error:  # TensorFlow's, for a variable of another shape.
            if "incompatible tensor" not in str(error):
                raise
            raise UserError(f"{path} holds the weights of another network than {os.path.dirname(directory.rstrip('/'))}"
                            f"/{CONFIG} describes ({one_line(error)}): a config.json edited or copied from "
                            "another run?") from None
    if damaged:
        raise UserError(f"every checkpoint in {directory} is damaged: " + "; ".join(
            f"{os.path.basename(path)} ({why})" for path, why in damaged))
    raise FileNotFoundError(f"{os.path.dirname(directory.rstrip('/'))} has no checkpoint under {CHECKPOINTS}/")


def remove_partial_saves(directory):
    """Removes what a failed or killed save left in a checkpoint directory (TensorFlow's `ckpt-N_temp/`)."""
    for name in tf.io.gfile.listdir(directory) if tf.io.gfile.isdir(directory) else []:
        if name.rstrip("/").endswith("_temp"):
            tf.io.gfile.rmtree(os.path.join(directory, name.rstrip("/")))


@contextlib.contextmanager
def space_for(directory, size):
    """Around a save of `size` bytes into `directory`: a full disk is one line saying how much it needs,
    and leaves no partial save behind."""
    try:
        yield
    except tf.errors.OpError as error:
        if "No space left on device" not in str(error):
            raise
        remove_partial_saves(directory)
        existing = directory
        while "://" not in existing and not os.path.isdir(existing):  # The disk may fill before it exists.
            existing = os.path.dirname(existing) or "."
        free = "" if "://" in directory else f", {shutil.disk_usage(existing).free / 2 ** 20:,.1f} MB are free"
        raise OSError(f"no space left on device for a checkpoint in {directory}: it takes about {size / 2 ** 20:,.1f} "
                      f"MB{free}; make room and run the same command to resume") from None


def damage_report(damaged, used):
    """The one line saying which checkpoints were damaged and which one was used instead."""
    return (f"damaged checkpoint{'s' if len(damaged) > 1 else ''} "
            + "; ".join(f"{os.path.basename(path)} ({why})" for path, why in damaged)
            + f": using {os.path.basename(used)}")


def forget(directory, damaged, used):
    """Drops damaged checkpoints from `directory`'s list, so that training goes on from `used` (their
    files stay, for a look; the next saves of those steps replace them)."""
    state = tf.train.get_checkpoint_state(directory)
    bad = {path for path, _ in damaged}
    kept = [path for path in state.all_model_checkpoint_paths if path not in bad]
    tf.compat.v1.train.update_checkpoint_state(directory, os.path.basename(used),  # Relative, as the manager's.
                                               [os.path.basename(path) for path in kept])


def write_run_files(model_dir, config, class_names, stats):
    """Writes config.json, labels.txt and stats.npz beside the checkpoints (each atomically)."""
    tf.io.gfile.makedirs(model_dir)
    stats.save(os.path.join(model_dir, STATS))
    write_labels(os.path.join(model_dir, LABELS), class_names)
    _write_json(os.path.join(model_dir, CONFIG), config)  # Last: it marks a run.


def _write_json(path, value):
    write_file(path, json.dumps(value, indent=2, sort_keys=True))


def read_run_files(model_dir):
    """The RunFiles of a run directory, or FileNotFoundError naming what is missing."""
    for name in (CONFIG, LABELS):
        if not tf.io.gfile.exists(os.path.join(model_dir, name)):
            raise FileNotFoundError(f"{model_dir} is not a training run: it has no {name}")
    path = os.path.join(model_dir, CONFIG)
    with tf.io.gfile.GFile(path) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as error:
            raise UserError(f"{path} is damaged: line {error.lineno}, column {error.colno}: {error.msg} "
                             "(it holds the run's settings as JSON)") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise UserError(f"{path} is damaged: expected a JSON object with the run's settings and its \"model\"")
    return RunFiles(config, read_labels(os.path.join(model_dir, LABELS)),
                    os.path.join(model_dir, STATS))

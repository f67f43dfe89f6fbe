"""keras-alexnet: Krizhevsky, Sutskever & Hinton's 2012 AlexNet in TensorFlow / Keras 3.

Its programs (`python -m keras_alexnet.X`) print only their own lines: below, before TensorFlow is
imported, its C++ logging is turned down and Python's warnings off; cli.reports_errors turns down the
Python loggers. KERAS_ALEXNET_VERBOSE=1 brings it all back. A library user's `import keras_alexnet`
leaves all of it as TensorFlow sets it.
"""
import contextlib
import os
import sys
import warnings


@contextlib.contextmanager
def _stderr_dropped():
    """File descriptor 2 to /dev/null for the block: what C++ libraries write there is lost."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def quietly():
    """In a quiet program, a block whose C++ libraries' lines (LiteRT's converter and interpreter) are dropped."""
    return _stderr_dropped() if QUIET else contextlib.nullcontext()


# A program: while `python -m keras_alexnet.X` imports this package, sys.argv[0] is "-m" (runpy sets the path
# after). KERAS_ALEXNET_VERBOSE, where set, decides instead (0: quiet); it hands a program's choice on to its
# child processes (ablate's variants).
_PROGRAM = sys.argv[:1] == ["-m"] and "-m" in sys.orig_argv[:-1] and \
    sys.orig_argv[sys.orig_argv.index("-m") + 1].startswith("keras_alexnet.")  # Not another package's -m.
QUIET = os.environ.get("KERAS_ALEXNET_VERBOSE", "0" if _PROGRAM else "1") == "0"
if QUIET:
    os.environ["KERAS_ALEXNET_VERBOSE"] = "0"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # 3: not even ERROR ("failed call to cuInit").
    warnings.simplefilter("ignore")
    if os.environ["TF_CPP_MIN_LOG_LEVEL"] != "0":  # Its libraries log as they load, before they read the level.
        with _stderr_dropped():
            import tensorflow  # noqa: F401

from keras_alexnet.lrn import LocalResponseNormalization, local_response_normalization
from keras_alexnet.model import build_alexnet, feature_model
from keras_alexnet.optimizer import PaperSGD
from keras_alexnet.epoch_rules import PaperPlateau
from keras_alexnet.applications import AlexNet, decode_predictions, preprocess_input

__all__ = ["LocalResponseNormalization", "local_response_normalization", "build_alexnet",
           "feature_model", "PaperSGD", "PaperPlateau", "AlexNet", "preprocess_input",
           "decode_predictions"]

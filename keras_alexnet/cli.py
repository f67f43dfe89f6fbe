"""What every program shares: bad input ends as one line `error: ...` and exit status 1, the
output is the program's own lines, and GPU memory is taken as needed, not all of every GPU at once.

    @cli.reports_errors
    def main(argv): ...

Bad input (`is_bad_input`) is an errors.UserError (the product's refusals, also when raised inside a
tf.numpy_function), an OSError (missing, read-only, a file where a folder belongs, ...), and TensorFlow's
errors about files, a full disk or a failed tf.debugging.Assert of ours; its line is the first of its
message (without the graph dump).
Ctrl-C is a line `interrupted` and status 130. Anything else is a bug and keeps its traceback.

In a program (keras_alexnet.QUIET) absl's and TensorFlow's Python loggers print errors only, unless
absl's --verbosity is given; keras_alexnet/__init__.py quiets TensorFlow's C++ log and Python's warnings.
"""
import functools
import logging
import os
import re
import sys

import tensorflow as tf
from absl import flags
from absl import logging as absl_logging

from keras_alexnet import QUIET
from keras_alexnet.errors import UserError

# TensorFlow's errors about files; and, of any class, messages of a file where a folder belongs (or the
# reverse: FailedPrecondition), a full disk (ResourceExhausted) and our in-graph checks (tf.debugging.Assert).
FILE_ERRORS = (tf.errors.NotFoundError, tf.errors.PermissionDeniedError, tf.errors.DataLossError)
BAD_INPUT_MESSAGE = re.compile(r"assertion failed: \[|is not a directory|Not a directory|Is a directory|"
                               r"No space left on device")


def is_bad_input(error):
    """Whether `error` is about something the user gave (a flag, a file, data), not a bug."""
    if isinstance(error, (UserError, OSError) + FILE_ERRORS):
        return True
    return isinstance(error, tf.errors.OpError) and (bool(BAD_INPUT_MESSAGE.search(error.message))
                                                     or raised_in_graph(error) is not None)


def raised_in_graph(error):
    """The message of a UserError raised in a tf.numpy_function (sources.py's array_record reads), else None.
    TensorFlow gives it as an OpError whose message holds the function's traceback; its last line is the
    error that ended it ("keras_alexnet.preprocess.DataError: ..."), after any it was raised from."""
    if not isinstance(error, tf.errors.OpError) or "Traceback (most recent call last):" not in error.message:
        return None
    lines = [line for line in error.message.splitlines() if line.strip() and not line[0].isspace()]
    name, _, message = lines[-1].partition(": ")
    module, _, class_name = name.rpartition(".")
    raised = getattr(sys.modules.get(module) if module.startswith("keras_alexnet.") else None, class_name, None)
    return message if isinstance(raised, type) and issubclass(raised, UserError) else None


def one_line(error):
    """The first line of an error's message; of an OpError, its own message, not the graph's context."""
    raised = raised_in_graph(error)
    if raised is not None:
        return raised
    text = error.message if isinstance(error, tf.errors.OpError) else str(error)
    lines = [line for line in text.splitlines() if line.strip() and not line[0].isspace()
             and not line.startswith(("Graph execution error:", "Detected at node"))]
    line = lines[0].strip() if lines else type(error).__name__
    assertion = re.fullmatch(r"assertion failed: \[(.*)\]", line)  # tf.debugging.Assert's wrapping.
    return assertion.group(1) if assertion else line


def reports_errors(main):
    """Decorator for a program's main (or a child process's target): see the module's docstring."""
    @functools.wraps(main)
    def wrapped(*args):
        # Before the first op: a process takes GPU memory as it needs it, not all of every GPU, so that an
        # evaluate or export beside a run, or two workers on one host, fit.
        os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
        if QUIET and not flags.FLAGS["verbosity"].present:
            absl_logging.set_verbosity(absl_logging.ERROR)
            tf.get_logger().setLevel(logging.ERROR)  # It has a handler of its own (ablate's children: only that).
        try:
            return main(*args)
        except (UserError, OSError, tf.errors.OpError) as error:
            if not is_bad_input(error):
                raise
            sys.exit(f"error: {one_line(error)}")
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
    return wrapped

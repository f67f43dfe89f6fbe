"""What every command shares: bad input ends as one line `error: ...` and exit status 1.

    @cli.reports_errors()
    def main(argv): ...

User-facing errors are ValueError (preprocess.DataError too), OSError (missing, read-only, a file where a
folder belongs, ...) and TensorFlow's OpError (the first line of its message, without the graph
dump); Ctrl-C is a line `interrupted` and status 130. Anything else is a bug and keeps its traceback.
"""
import functools
import re
import sys

import tensorflow as tf

USER_ERRORS = (ValueError, OSError, tf.errors.OpError)


def one_line(error):
    """The first line of an error's message; of an OpError, its own message, not the graph's context."""
    text = error.message if isinstance(error, tf.errors.OpError) else str(error)
    lines = [line for line in text.splitlines() if line.strip() and not line[0].isspace()
             and not line.startswith(("Graph execution error:", "Detected at node"))]
    line = lines[0].strip() if lines else type(error).__name__
    assertion = re.fullmatch(r"assertion failed: \[(.*)\]", line)  # tf.debugging.Assert's wrapping.
    return assertion.group(1) if assertion else line


def reports_errors(*more_errors):
    """Decorator for an absl main: USER_ERRORS (and `more_errors`) exit with one line and status 1."""
    def decorate(main):
        @functools.wraps(main)
        def wrapped(argv):
            try:
                return main(argv)
            except USER_ERRORS + more_errors as error:
                sys.exit(f"error: {one_line(error)}")
            except KeyboardInterrupt:
                print("interrupted", file=sys.stderr)
                sys.exit(130)
        return wrapped
    return decorate


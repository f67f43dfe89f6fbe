"""Writing files so that a crash, a kill or a full disk leaves the old file or the new one, never half.

The package's run files, checkpoints' companions, caches, exports and reports are written through
`atomic_write` (a file or a directory). It imports nothing of the package: every stage may use it.
"""
import contextlib
import io
import os

import tensorflow as tf


@contextlib.contextmanager
def atomic_write(path):
    """Yields a temporary path beside `path` (".NAME.tmp") to write; renamed to `path` when the block
    ends, removed when it raises. Works for files and directories, local or on GCS (tf.io.gfile)."""
    path = str(path) if "://" in str(path) else os.path.normpath(path)  # "runs/a/" names runs/a too.
    temporary = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    _remove(temporary)  # Left by a killed writer.
    try:
        try:
            yield temporary
        except (OSError, tf.errors.OpError) as error:  # "Permission denied: .../.x.tmp" names the file meant.
            text = error.message if isinstance(error, tf.errors.OpError) else str(error)  # (cli is downstream.)
            if temporary not in text:
                raise
            raise OSError(text.replace(temporary, path)) from None
        if tf.io.gfile.isdir(temporary):
            replace_dir(temporary, path)
        else:
            tf.io.gfile.rename(temporary, path, overwrite=True)
    finally:
        _remove(temporary)


def write_file(path, content):
    """Writes `content` (str or bytes) to `path` through `atomic_write`."""
    with atomic_write(path) as temporary, tf.io.gfile.GFile(temporary, "wb" if isinstance(content, bytes) else "w") as f:
        f.write(content)


def write_png(figure, path):
    """Saves a matplotlib figure as a PNG at `path` through `atomic_write`."""
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=100, format="png")
    write_file(path, buffer.getvalue())


def _remove(path):
    if tf.io.gfile.isdir(path):
        tf.io.gfile.rmtree(path)
    elif tf.io.gfile.exists(path):
        tf.io.gfile.remove(path)


def replace_dir(staging, path):
    """Renames the finished directory `staging` to `path`, replacing an old `path`.

    The old directory is moved aside first and deleted last, so `path` is never half written.
    """
    old = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.old")
    _remove(old)
    if tf.io.gfile.exists(path):
        tf.io.gfile.rename(path, old)
    tf.io.gfile.rename(staging, path)
    _remove(old)

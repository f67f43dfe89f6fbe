"""What a long job shows while it runs: progress bars, an epoch's progress with a time estimate.

On a terminal the progress is a bar; written to a file or a CI log it is one plain line per update,
without terminal control codes.
"""
import sys
import time

import keras


def is_terminal():
    return hasattr(sys.stdout, "isatty") and sys.stdout.isatty()


def progress_bar(total, unit_name, verbose=True):
    """Something to `add(n)` to: Keras's bar on a terminal, plain lines in a log (PlainProgress)."""
    if not verbose:
        return keras.utils.Progbar(total, verbose=0)
    return keras.utils.Progbar(total, unit_name=unit_name) if is_terminal() else PlainProgress(total, unit_name)


class PlainProgress:
    """A line `done/total done, rate unit/s` every `every` seconds and at the end: no control codes."""

    def __init__(self, total, unit_name, every=10.0):
        self.total, self.unit, self.every = total, unit_name, every
        self.done, self._started = 0, time.perf_counter()
        self._printed = self._started

    def add(self, count):
        self.done += count
        now = time.perf_counter()
        if now - self._printed >= self.every or (self.total and self.done >= self.total):
            self._printed = now
            rate = self.done / max(now - self._started, 1e-9)
            print(f"{self.done}/{self.total or '?'} done, {rate:.1f} {self.unit}/s", flush=True)


class Progress:
    """The progress of one epoch, updated after each loop of steps.

    Prints what the epoch will do, then (once a loop has been timed, so that tracing is not counted)
    how long it will take, then the running metrics: a bar on a terminal, a line per update elsewhere.
    """

    def __init__(self, title, total_steps, done, batch_size, learning_rate, traced=False):
        """traced: the step function is traced already, so the first loop can be timed too."""
        self.title, self.total, self.batch_size = title, total_steps, batch_size
        self.speed, self._timed_from = 0.0, done
        self._started = time.perf_counter() if traced else None
        print(f"{title}: {total_steps - done} steps of {batch_size} images, learning rate {learning_rate:.2g}"
              + (f" (resumed after step {done})" if done else ""), flush=True)
        self._bar = keras.utils.Progbar(total_steps, stateful_metrics=["loss", "top1_err", "top5_err", "img/s"]) \
            if is_terminal() else None
        if self._bar:
            self._bar.update(done)

    def update(self, done, errors):
        """`done` steps of the epoch are finished, with these running `errors`; returns img/s."""
        now = time.perf_counter()
        if self._started is None:  # The first loop traced the step: time from its end.
            self._started, self._timed_from = now, done
        elif done > self._timed_from:
            first_estimate = not self.speed
            self.speed = (done - self._timed_from) * self.batch_size / (now - self._started)
            if first_estimate and done < self.total:
                minutes = (self.total - done) * self.batch_size / self.speed / 60
                print(f"{self.title}: about {minutes:.1f} min left at {self.speed:.1f} img/s", flush=True)
        values = [("loss", errors["loss"]), ("top1_err", errors["top1_error"]),
                  ("top5_err", errors["top5_error"]), ("img/s", self.speed)]
        if self._bar:
            self._bar.update(done, values)
        else:
            print(f"{self.title} step {done}/{self.total}: " + " ".join(
                f"{name} {value:.4f}" if name == "loss" else f"{name} {value:.3g}" for name, value in values),
                flush=True)
        return self.speed


class ClearableBar:
    """For output printed between updates (predict's lines): a bar on a terminal that `clear` wipes
    before each line, else "batch i/n" lines on stderr; nothing for a single batch."""

    def __init__(self, batches):
        self.batches, self.tty = batches, is_terminal()

    def clear(self):
        if self.batches > 1 and self.tty:
            sys.stdout.write("\r\033[K")

    def update(self, done):
        if self.batches <= 1:
            return
        if self.tty:
            filled = 30 * done // self.batches
            sys.stdout.write(f"[{'=' * filled}{'.' * (30 - filled)}] batch {done}/{self.batches}")
            sys.stdout.flush()
        else:
            print(f"batch {done}/{self.batches}", file=sys.stderr, flush=True)

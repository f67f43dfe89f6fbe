"""python -m keras_alexnet.data_service dispatcher|worker: TensorFlow's tf.data service, for hosts whose CPUs
cannot feed their GPUs.

    python -m keras_alexnet.data_service dispatcher --port=5050 --work_dir=DIR
    python -m keras_alexnet.data_service worker --dispatcher=HOST:5050 --port=5051
    python -m keras_alexnet.train --data_service=grpc://HOST:5050 ...

The dispatcher is fault tolerant: it journals its state in --work_dir before it answers, so one restarted
with the same --work_dir carries on its jobs. Each prints one line once it serves and runs until SIGTERM
or Ctrl-C. `on_service` moves a training pipeline's decode and augmentation onto the workers.
"""
import os
import signal
import socket
import sys
import threading

import tensorflow as tf
from absl import app, flags

from keras_alexnet import cli
from keras_alexnet.config import check_address
from keras_alexnet.errors import UserError

FLAGS = flags.FLAGS
def check_dispatcher(address, flag):
    """`address` as HOST:PORT, or a UserError naming `flag` when no dispatcher answers there (TensorFlow
    would wait for it for an hour)."""
    host, port = check_address(address, flag).removeprefix("grpc://").rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as error:
        raise UserError(f"{flag}: no dispatcher answers at {host}:{port} ({error.strerror or error}): "
                        "start one with python -m keras_alexnet.data_service dispatcher") from None
    return f"{host}:{port}"


def check_service(address, source, name):
    """Refuses, before a run starts, a dispatcher that does not answer, a relative --dataset, and a training
    split the service's workers cannot read: one read in order (TFDS's files: the
    workers would shuffle their own), or one whose records are read by Python (tf.numpy_function: a
    prepared dataset's array_record files), which runs in this process only."""
    check_dispatcher(address, "--data_service")
    if source.lookup is None:
        raise UserError(f"--data_service needs a split read by index; {name} is read in order: use a folder")
    graph = tf.function(source.lookup).get_concrete_function(tf.TensorSpec([None], tf.int64)).graph
    if any(op.type in ("PyFunc", "PyFuncStateless", "EagerPyFunc") for op in graph.get_operations()):
        raise UserError(f"--data_service: {name}'s records are read by Python code, which the service's workers "
                        "cannot run: use a folder of images (on a file system the workers see too)")
    if os.path.isdir(name) and not os.path.isabs(name):
        raise UserError(f"--data_service: the workers read --dataset's files themselves, from their own working "
                        f"directory: give its absolute path (on a file system they see), not {name}")


def on_service(address, window=16):
    """data.train_pipeline's `service`: (first, last, make) -> the element `make` gives of each step of
    [first, last) (of its one-number dataset), computed on the service's workers, in the order of the steps.

    The step numbers are the splits (ShardingPolicy.DYNAMIC): a worker takes one, computes its whole
    element (its decode and augmentation in parallel) and asks for the next, so every element is computed
    once and a worker holds one step at a time. They arrive as workers finish them and wait here
    (`_in_order`) for the earlier ones.
    """
    address = check_address(address)

    def serve(first, last, make):
        tagged = tf.data.Dataset.range(first, last).flat_map(lambda step: tf.data.Dataset.zip(
            tf.data.Dataset.from_tensors(step), make(tf.data.Dataset.from_tensors(step))))
        served = tagged.apply(tf.data.experimental.service.distribute(
            tf.data.experimental.service.ShardingPolicy.DYNAMIC, address))
        return _in_order(served, first, last, make, window)

    return serve


def _in_order(served, first, last, make, window):
    """(step, element) of steps [first, last), each at most once, in any order -> the elements in the steps'
    order. A step waits for the earlier ones. One that has not come while `window` later ones wait, or by
    the end, is computed here with `make` (a worker that dies loses the steps it held: the service visits
    each split at most once), and dropped if it comes after all."""
    structure = served.element_spec[1]
    specs = tf.nest.flatten(structure)
    waiting = tf.lookup.experimental.MutableHashTable(  # Step -> its element, as a tf.experimental.Optional.
        tf.int64, tf.variant, tf.raw_ops.OptionalNone())
    cursor = tf.lookup.experimental.MutableHashTable(tf.int64, tf.int64, first)  # 0 -> the next step to give out.
    zero = tf.zeros([1], tf.int64)
    next_step = lambda: tf.reshape(cursor.lookup(zero), [])
    has_come = lambda step: tf.raw_ops.OptionalHasValue(optional=tf.reshape(waiting.lookup(step[None]), []))

    def pop(step, came):
        element = tf.raw_ops.OptionalGetValue(optional=tf.reshape(waiting.lookup(step[None]), []),
                                              output_types=[s.dtype for s in specs],
                                              output_shapes=[s.shape for s in specs])
        with tf.control_dependencies([waiting.remove(step[None])]):
            return tf.nest.pack_sequence_as(structure, [tf.identity(tensor) for tensor in element])

    def announce(step, came):
        with tf.control_dependencies([tf.print("tf.data service: step", step, "of the epoch did not come (lost with "
                                               "a worker, or late); computed here", output_stream=sys.stdout)]):
            return tf.identity(step)

    def take(step, came):  # The step's element: the one that came, else computed here.
        one = tf.data.Dataset.from_tensors((step, came))
        return one.filter(lambda step, came: came).map(pop).concatenate(
            make(one.filter(lambda step, came: tf.logical_not(came)).map(announce)))

    def give_out(upto):  # Steps [cursor, upto), in order.
        start = next_step()
        with tf.control_dependencies([cursor.insert(zero, upto[None])]):
            return tf.data.Dataset.range(start, upto).map(lambda step: (step, has_come(step))).flat_map(take)

    def arrive(step, element):  # Keeps a step not given out yet, then gives out the steps that can go.
        kept = tf.cond(step >= next_step(), lambda: tf.group(waiting.insert(
            step[None], tf.raw_ops.OptionalFromValue(components=tf.nest.flatten(element))[None])), tf.no_op)
        with tf.control_dependencies([kept]):
            upto, _ = tf.while_loop(  # Past each step that came, and each given up on.
                lambda upto, held: (upto < last) & (has_come(upto) | (held >= window)),
                lambda upto, held: (upto + 1, held - tf.cast(has_come(upto), tf.int64)),
                [next_step(), waiting.size()])
        return give_out(upto)

    return served.flat_map(arrive).concatenate(
        tf.data.Dataset.from_tensors(tf.constant(last, tf.int64)).flat_map(give_out))


def define_flags():
    flags.DEFINE_integer("port", 0, "Port to serve on (0: any free one, printed).", lower_bound=0, upper_bound=65535)
    flags.DEFINE_string("work_dir", None, "dispatcher: where it journals its state (fault tolerance).")
    flags.DEFINE_string("dispatcher", None, "worker: the dispatcher's HOST:PORT.")
    flags.DEFINE_string("host", socket.gethostname(), "worker: the name trainers reach this host by (the "
                        "dispatcher hands it to them).")


def _serve(role):
    """The started server of `role` and the line saying where it serves."""
    if role == "dispatcher":
        if not FLAGS.work_dir:
            raise UserError("dispatcher needs --work_dir: where it journals its state, to survive a restart")
        server = tf.data.experimental.service.DispatchServer(tf.data.experimental.service.DispatcherConfig(
            port=FLAGS.port, work_dir=FLAGS.work_dir, fault_tolerant_mode=True))
        return server, f"tf.data service dispatcher at {server.target} (journal in {FLAGS.work_dir})"
    if not FLAGS.dispatcher:
        raise UserError("worker needs --dispatcher=HOST:PORT")
    dispatcher = check_dispatcher(FLAGS.dispatcher, "--dispatcher")  # Else WorkerServer waits, silent.
    server = tf.data.experimental.service.WorkerServer(tf.data.experimental.service.WorkerConfig(
        dispatcher_address=dispatcher, port=FLAGS.port, worker_address=f"{FLAGS.host}:%port%"))
    port = server._address.split(":")[-1]  # The port bound (--port=0: any); WorkerServer has no public one.
    return server, f"tf.data service worker at {FLAGS.host}:{port} for {dispatcher}"


@cli.reports_errors
def main(argv):
    if len(argv) != 2 or argv[1] not in ("dispatcher", "worker"):
        raise UserError("usage: python -m keras_alexnet.data_service dispatcher|worker [flags]")
    server, line = _serve(argv[1])
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(line, flush=True)
    stop.wait()
    server.stop()
    print(f"{argv[1]} stopped", flush=True)


if __name__ == "__main__":
    define_flags()
    app.run(main)

"""Devices and the tf.distribute strategy: the paper's two towers per replica, replicas per worker.

With --towers_per_replica=2 and D devices there are D/2 replicas; replica i runs tower A on device 2i
and tower B on device 2i+1, the paper's two-GPU split (section 3.2), repeated for data parallelism.
TF_CONFIG makes it MultiWorkerMirroredStrategy across processes.
"""
import os

import tensorflow as tf


def split_cpu(count):
    """Splits the CPU into `count` logical devices (before TensorFlow initialises them)."""
    if count:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)


def make_strategy(towers_per_replica, devices=None):
    """(strategy, plan): plan maps each replica's device to its (tower A, tower B) devices.

    Uses MultiWorkerMirroredStrategy when TF_CONFIG is set, else MirroredStrategy over `devices`
    (default: the local GPUs, or the logical CPUs when there is no GPU).
    """
    # MultiWorkerMirroredStrategy must exist before anything else initialises TensorFlow's devices.
    strategy = tf.distribute.MultiWorkerMirroredStrategy() if os.environ.get("TF_CONFIG") else None
    # Local names ("/device:GPU:1"): inside a replica they take the replica's job and task.
    devices = devices or [f"/device:{d.device_type}:{d.name.rsplit(':', 1)[1]}" for d in
                          tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")]
    if towers_per_replica == 2 and len(devices) % 2 and len(devices) > 1:
        raise ValueError(f"--towers_per_replica=2 pairs the {len(devices)} devices, and {devices[-1]} would be "
                         "left unused: use an even number of devices (--cpu_devices) or --towers_per_replica=1")
    pairs = [(d, d) for d in devices] if towers_per_replica == 1 or len(devices) == 1 else \
        [tuple(devices[i:i + 2]) for i in range(0, len(devices), 2)]
    if strategy:
        replicas = strategy.extended.worker_devices
    else:
        replicas = [a for a, _ in pairs]
        strategy = tf.distribute.MirroredStrategy(replicas)
    plan = {replica: list(pair) for replica, pair in zip(replicas, pairs)}
    return strategy, plan


def is_chief(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "chief" or (not has_chief and resolver.task_type == "worker"
                                             and resolver.task_id == 0)

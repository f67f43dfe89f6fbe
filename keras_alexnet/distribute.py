"""Devices and the tf.distribute strategy: the paper's two towers per replica, replicas per worker.

With --towers_per_replica=2 and D devices a worker runs R = D/2 replicas; replica i runs tower A on
device i and tower B on device R + i, the paper's two-GPU split (section 3.2), repeated for data
parallelism. With --towers_per_replica=1 every device is a replica running both towers. One rule
for one worker and for several: under TF_CONFIG, MultiWorkerMirroredStrategy makes a worker's first
R GPUs its replicas (it is told R), and tower B of replica i takes GPU R + i. Each tower's weights
live on its device (model.tower_variables).

On GPUs the workers' all-reduce is asked to use NCCL; one worker's MirroredStrategy picks it itself.
"""
import os

import tensorflow as tf

from keras_alexnet.errors import UserError
from keras_alexnet.model import local_name


def split_cpu(count):
    """Splits the CPU into `count` logical devices (before TensorFlow initialises them)."""
    if count:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)


def local_devices():
    """This process's GPUs, or else its logical CPUs, as local names ("/device:GPU:1"), without
    initialising TensorFlow's devices (MultiWorkerMirroredStrategy must come first)."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return [f"/device:GPU:{i}" for i in range(len(gpus))]
    cpus = tf.config.get_logical_device_configuration(tf.config.list_physical_devices("CPU")[0])
    return [f"/device:CPU:{i}" for i in range(len(cpus or [None]))]


def _on_gpus(devices):
    return local_name(devices[0]).startswith("GPU")


def device_plan(devices, towers_per_replica, multi_worker=False):
    """{replica device: [tower A device, tower B device]} of one worker's `devices` (see the module's
    docstring), or a UserError for a plan the strategy cannot run."""
    two = towers_per_replica == 2 and len(devices) > 1
    if two and len(devices) % 2:
        fix = "CUDA_VISIBLE_DEVICES with an even number of GPUs" if _on_gpus(devices) else "an even --cpu_devices"
        raise UserError(f"--towers_per_replica=2 pairs the {len(devices)} devices, and {devices[-1]} would be "
                        f"left unused: use {fix}, or --towers_per_replica=1")
    replicas = len(devices) // 2 if two else len(devices)
    if multi_worker and not _on_gpus(devices) and replicas > 1:  # MultiWorkerMirroredStrategy's rule.
        raise UserError(f"under TF_CONFIG a worker without GPUs runs one replica, not {replicas}: use "
                        "--cpu_devices=2 for two towers, or 1 with --towers_per_replica=1")
    return {devices[i]: [devices[i], devices[replicas + i] if two else devices[i]] for i in range(replicas)}


def make_strategy(towers_per_replica, devices=None):
    """(strategy, plan): device_plan of `devices` (default: local_devices()), and its strategy.

    MultiWorkerMirroredStrategy when TF_CONFIG is set (its plan keyed by the worker's replica devices),
    else MirroredStrategy over the plan's replica devices.
    """
    devices = devices or local_devices()
    if not os.environ.get("TF_CONFIG"):
        plan = device_plan(devices, towers_per_replica)
        return tf.distribute.MirroredStrategy(list(plan)), plan
    plan = device_plan(devices, towers_per_replica, multi_worker=True)
    tf_config, gpus = tf.distribute.cluster_resolver.TFConfigClusterResolver(), _on_gpus(devices)
    # With TFConfigClusterResolver every local GPU would be a replica: this resolver says how many.
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf_config.cluster_spec(), task_type=tf_config.task_type, task_id=tf_config.task_id,
        rpc_layer=tf_config.rpc_layer, num_accelerators={"GPU": len(plan)} if gpus else {})
    implementation = tf.distribute.experimental.CommunicationImplementation
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        cluster_resolver=resolver, communication_options=tf.distribute.experimental.CommunicationOptions(
            implementation=implementation.NCCL if gpus else implementation.AUTO))
    replicas = strategy.extended.worker_devices
    if [local_name(r) for r in replicas] != [local_name(d) for d in plan]:
        raise UserError(f"MultiWorkerMirroredStrategy made the replicas {', '.join(replicas)}, not the plan's "
                        f"{', '.join(plan)}")
    return strategy, dict(zip(replicas, plan.values()))


def describe(plan):
    """The plan as one line: every replica, its device and its towers' devices."""
    return "; ".join(f"replica {i} on {r} -> towers on {a}, {b}" for i, (r, (a, b)) in enumerate(plan.items()))


def is_chief(strategy):
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "chief" or (not has_chief and resolver.task_type == "worker"
                                             and resolver.task_id == 0)

"""Devices and the tf.distribute strategy: the paper's two towers per replica, replicas per worker.

With --towers_per_replica=2 and D devices a worker runs R = D/2 replicas; replica i runs tower A on
device i and tower B on device R + i, the paper's two-GPU split (section 3.2), repeated for data
parallelism. With --towers_per_replica=1 every device is a replica running both towers. One rule
for one worker and for several: under TF_CONFIG, MultiWorkerMirroredStrategy makes a worker's first
R GPUs its replicas (it is told R), and tower B of replica i takes GPU R + i. Each tower's weights
live on its device (model.tower_variables). The workers are TF_CONFIG's (Kubeflow's TFJob sets it), or
with --cluster=slurm the tasks of the srun step (SlurmClusterResolver).

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
        raise UserError(f"under TF_CONFIG or --cluster=slurm a worker without GPUs runs one replica, not {replicas}: "
                        "use --cpu_devices=2 for two towers, or 1 with --towers_per_replica=1")
    return {devices[i]: [devices[i], devices[replicas + i] if two else devices[i]] for i in range(replicas)}


SLURM_VARIABLES = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST", "SLURM_STEP_TASKS_PER_NODE")


def cluster_resolver(cluster, devices, port):
    """The workers' resolver: Slurm's for cluster="slurm", else TF_CONFIG's when it is set, else None (one worker).

    SlurmClusterResolver is told each task's GPUs, the ones this process sees (Slurm's --gpus-per-task gives
    each task its own), so it runs no nvidia-smi (absent on CPU nodes) and leaves CUDA_VISIBLE_DEVICES alone.
    It places a node's tasks by striding its GPUs, so a CPU task is told 1 (of 0 it would place none), and a
    node enough for all of the step's tasks. Task k of a node serves on `port` + k.
    """
    if cluster != "slurm":
        return tf.distribute.cluster_resolver.TFConfigClusterResolver() if os.environ.get("TF_CONFIG") else None
    missing = [name for name in SLURM_VARIABLES if name not in os.environ]
    if missing:
        raise UserError(f"--cluster=slurm: {', '.join(missing)} not set: start train with srun")
    per_task = len(devices) if _on_gpus(devices) else 1
    return tf.distribute.cluster_resolver.SlurmClusterResolver(
        port_base=port, gpus_per_node=per_task * int(os.environ["SLURM_STEP_NUM_TASKS"]), gpus_per_task=per_task,
        auto_set_gpu=False)


def mirrored_strategy(devices):
    """A MirroredStrategy over `devices`, with collective keys of its own: strategies made in one process
    must not share them (TensorFlow's own tests do the same, strategy_combinations.py)."""
    tf.distribute.MirroredStrategy._collective_key_base += 100_000
    return tf.distribute.MirroredStrategy(devices)


def make_strategy(towers_per_replica, devices=None, cluster="auto", port=8888):
    """(strategy, plan): device_plan of `devices` (default: local_devices()), and its strategy.

    MultiWorkerMirroredStrategy over cluster_resolver's workers (its plan keyed by the worker's replica
    devices), else MirroredStrategy over the plan's replica devices.
    """
    devices = devices or local_devices()
    workers = cluster_resolver(cluster, devices, port)
    if workers is None:
        plan = device_plan(devices, towers_per_replica)
        return mirrored_strategy(list(plan)), plan
    plan = device_plan(devices, towers_per_replica, multi_worker=True)
    spec, gpus = workers.cluster_spec(), _on_gpus(devices)  # Slurm's task_id is known after cluster_spec().
    # TF_CONFIG's resolver would make every local GPU a replica, Slurm's a GPU of a CPU task: this one says how many.
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        spec, task_type=workers.task_type, task_id=workers.task_id, rpc_layer=workers.rpc_layer,
        num_accelerators={"GPU": len(plan)} if gpus else {})
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

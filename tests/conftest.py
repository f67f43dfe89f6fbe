"""Shared test set-up: 4 logical CPU devices (towers, replicas and workers without GPUs), shared data."""
import re
import socket
from pathlib import Path

import keras
import pytest
import tensorflow as tf

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Before any op runs: once devices are initialised the split can no longer be made.
_cpu = tf.config.list_physical_devices("CPU")[0]
if len(tf.config.get_logical_device_configuration(_cpu) or []) < 4:
    tf.config.set_logical_device_configuration(_cpu, [tf.config.LogicalDeviceConfiguration()] * 4)


@pytest.fixture(scope="session")
def logical_cpus():
    """The names of the 4 logical CPU devices."""
    return [device.name for device in tf.config.list_logical_devices("CPU")]


def new_collective_keys():
    """Strategies made in one process must not share collective group keys (TensorFlow's own
    tests do this: `strategy_combinations.py`)."""
    tf.distribute.MirroredStrategy._collective_key_base += 100_000


@pytest.fixture(autouse=True)
def separate_strategies():
    new_collective_keys()


@pytest.fixture(scope="module", autouse=True)
def free_models():
    """Each AlexNet holds about 1 GB with its optimizer: let a module's models go before the next."""
    yield
    keras.backend.clear_session(free_memory=True)


@pytest.fixture(scope="session")
def free_port():
    """A function returning a free TCP port on 127.0.0.1."""
    def port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]
    return port


@pytest.fixture(scope="session")
def final_digest():
    """A function: the trainer's output -> (final weights digest, step)."""
    def parse(output):
        match = re.search(r"final weights digest (\w+) at step (\d+)", output)
        assert match, output[-3000:]
        return match.group(1), int(match.group(2))
    return parse

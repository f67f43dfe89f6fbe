"""Shared test set-up: 4 logical CPU devices (towers, replicas and workers without GPUs), shared data."""
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


@pytest.fixture(scope="module", autouse=True)
def free_models():
    """Each AlexNet holds about 1 GB with its optimizer: let a module's models go before the next."""
    yield
    keras.backend.clear_session(free_memory=True)

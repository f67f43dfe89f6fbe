"""keras-alexnet: the 2012 AlexNet (Krizhevsky, Sutskever & Hinton) in TensorFlow / Keras 3."""
from setuptools import find_packages, setup

setup(
    name="keras_alexnet",
    version="0.1.0",
    description="A faithful, usable reproduction of AlexNet (NIPS 2012) in TensorFlow/Keras 3",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["keras_alexnet", "keras_alexnet.*"]),
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.21",
        "keras>=3.15,<4",
        "tensorflow-datasets>=4.9.10",
        # tensorflow-datasets imports it in download_and_prepare without declaring it.
        "importlib_resources>=6.0",
        "numpy>=1.26",
        "absl-py>=2.1",
        "tensorboard>=2.20",
        "pillow>=10.0",
        "matplotlib>=3.8",
    ],
    extras_require={
        "and-cuda": ["tensorflow[and-cuda]>=2.21"],
        # pytest-xdist runs the suite in a process a core; tensorflow-serving-api parses the export's warm-up
        # requests in the tests (2.21 needs tensorflow >=2.21,<3).
        "dev": ["pytest>=8.0", "pytest-xdist>=3.6", "tensorflow-serving-api>=2.21"],
        "onnx": ["onnx>=1.16", "onnxruntime>=1.18"],  # keras_alexnet.convert and its tests.
        # export --formats (keras_alexnet.portable) and predict --model.
        "portable": ["ai-edge-litert>=2.3", "tf2onnx>=1.17", "onnx>=1.16", "onnxruntime>=1.18"],
    },
)

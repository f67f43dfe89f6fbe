"""keras-alexnet: Krizhevsky, Sutskever & Hinton's 2012 AlexNet in TensorFlow / Keras 3."""
from keras_alexnet.lrn import LocalResponseNormalization, local_response_normalization
from keras_alexnet.model import build_alexnet, feature_model

__all__ = ["LocalResponseNormalization", "local_response_normalization", "build_alexnet",
           "feature_model"]

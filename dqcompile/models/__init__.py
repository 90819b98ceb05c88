"""The embedded default model (a Fashion-MNIST DiT), its noise schedule, and the evaluation classifier."""

from dqcompile.models.classifier import (
    CLASSIFIER_CONFIG,
    FashionMNISTClassifier,
    build_classifier,
    classifier_record,
    load_classifier,
)
from dqcompile.models.fmnist import (
    FMNIST_DIT_CONFIG,
    FMNIST_SCHEDULER_CONFIG,
    NULL_CLASS_ID,
    NUM_CLASSES,
    build_fmnist_dit,
    embedded_training_record,
    load_embedded_config,
    load_embedded_model,
    make_scheduler,
)

__all__ = [
    "CLASSIFIER_CONFIG",
    "FMNIST_DIT_CONFIG",
    "FMNIST_SCHEDULER_CONFIG",
    "NULL_CLASS_ID",
    "NUM_CLASSES",
    "FashionMNISTClassifier",
    "build_classifier",
    "build_fmnist_dit",
    "classifier_record",
    "embedded_training_record",
    "load_classifier",
    "load_embedded_config",
    "load_embedded_model",
    "make_scheduler",
]

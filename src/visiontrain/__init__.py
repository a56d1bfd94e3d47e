"""visiontrain: train, evaluate, distill and export vision models on one tested engine."""

__version__ = "0.1.0"

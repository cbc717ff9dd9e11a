"""kdray: knowledge distillation for transparent medical image classifiers, on Ray + MLflow."""

__version__ = "0.1.0"
__all__ = ["__version__"]

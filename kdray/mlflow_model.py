"""A kdray model as a standard MLflow pyfunc, by MLflow's models-from-code (no pickle).

MLflow copies this file into every registered kdray model; ``mlflow.pyfunc.load_model`` runs it
and then calls :meth:`KdrayClassifier.load_context` on the model's ``kdray_model`` artifact
(``model.safetensors`` + ``model.json``). The Python environment needs kdray installed.

Input: a batch of RGB images, uint8 (N, H, W, 3) (any H, W: resized to the model's input size
bilinearly, as kdray's decoder does). Output: one column of class probabilities per class name.

The model's data record (``data.json``, :mod:`kdray.data.record`) is read with the weights:
``python_model.data`` says what the model was trained on (also the MLmodel metadata
``kdray.data``), and the input size and class names must agree with it.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

ARTIFACT = "kdray_model"


class KdrayClassifier(PythonModel):
    def load_context(self, context: Any) -> None:
        from kdray.data.record import load_record
        from kdray.models import load_model

        folder = context.artifacts[ARTIFACT]
        self.model, self.spec = load_model(folder)
        self.model.eval()
        self.data = load_record(folder)  # None for a version saved before kdray wrote records
        if self.data is not None and (
            self.data.image_size != self.spec.image_size
            or list(self.data.classes) != list(self.spec.class_names)
        ):
            raise ValueError(
                f"{folder}: the data record ({self.data.image_size} px, {self.data.classes}) "
                f"disagrees with the model ({self.spec.image_size} px, {self.spec.class_names})"
            )

    # No type hints on predict: MLflow would take them for an input schema of its own.
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        from PIL import Image

        from kdray.engine import predict_logits, softmax

        if isinstance(model_input, dict):  # a named tensor: {"images": array}
            (model_input,) = model_input.values()
        images = np.asarray(model_input)
        if images.ndim == 3:  # one image
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected RGB images (N, H, W, 3), got shape {images.shape}")
        size = self.spec.image_size
        if images.shape[1:3] != (size, size):
            images = np.stack(
                [
                    np.asarray(
                        Image.fromarray(np.asarray(im, dtype=np.uint8)).resize(
                            (size, size), Image.Resampling.BILINEAR
                        )
                    )
                    for im in images
                ]
            )
        batch = np.ascontiguousarray(images.astype(np.uint8).transpose(0, 3, 1, 2))
        probabilities = softmax(predict_logits(self.model, batch)).astype(np.float32)
        return pd.DataFrame(probabilities, columns=list(self.spec.class_names))


mlflow.models.set_model(KdrayClassifier())

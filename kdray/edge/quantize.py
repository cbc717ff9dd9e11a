"""Optional int8: the predict graph statically quantised with onnxruntime, and what it costs.

Only ``predict.onnx`` is quantised (``predict.int8.onnx``): the explanations stay in float, so
a map never changes with the predict path's precision. Convolutions and the head are quantised
per channel (QDQ format), calibrated on a seeded sample of the training split; the report is
the test accuracy of both graphs, their agreement and their speed, measured side by side.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kdray.edge.export import CARD_FILE, PREDICT_FILE, session

__all__ = ["INT8_FILE", "MAX_ACCURACY_DROP", "Int8Report", "quantize_predict"]

INT8_FILE = "predict.int8.onnx"
MAX_ACCURACY_DROP = 0.005  # the int8 graph is never the one to use beyond this drop


@dataclass
class Int8Report:
    calibration_images: int
    test_images: int
    fp32_accuracy: float
    int8_accuracy: float
    agreement: float
    fp32_ms: float  # per image, batch 16, the session's default threads
    int8_ms: float

    @property
    def accuracy_drop(self) -> float:
        return self.fp32_accuracy - self.int8_accuracy

    @property
    def usable(self) -> bool:
        """Accurate enough (drop <= MAX_ACCURACY_DROP) and faster than fp32."""
        return self.accuracy_drop <= MAX_ACCURACY_DROP and self.int8_ms < self.fp32_ms

    def describe(self) -> str:
        if self.accuracy_drop > MAX_ACCURACY_DROP:
            verdict = f"keep fp32 (accuracy drop above {MAX_ACCURACY_DROP})"
        elif self.int8_ms >= self.fp32_ms:
            verdict = "keep fp32 (int8 is not faster on this CPU)"
        else:
            verdict = "int8 usable"
        return (
            f"int8 test accuracy {self.int8_accuracy:.3f} against fp32 {self.fp32_accuracy:.3f} "
            f"({self.test_images} images; labels agree on {self.agreement:.1%}); "
            f"{self.int8_ms:.2f} ms against {self.fp32_ms:.2f} ms an image at batch 16: {verdict}"
        )


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over uint8 batches."""

    def __init__(self, images: np.ndarray, batch: int = 16) -> None:
        self._batches = iter(
            [{"image": images[i : i + batch]} for i in range(0, len(images), batch)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _ms_per_image(sess, images: np.ndarray, batch: int = 16, repeats: int = 5) -> float:
    x = images[:batch]
    sess.run(None, {"image": x})
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        sess.run(None, {"image": x})
        best = min(best, time.perf_counter() - started)
    return best / len(x) * 1000


def _accuracy(sess, images: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    pred = np.concatenate(
        [sess.run(["logits"], {"image": images[i : i + 64]})[0] for i in range(0, len(images), 64)]
    ).argmax(1)
    return float((pred == labels).mean()), pred


def quantize_predict(
    directory: str | Path,
    calibration: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
) -> Int8Report:
    """Write ``predict.int8.onnx`` beside an export and record the report in its card.

    Args:
        calibration: uint8 (N, 3, S, S) training images (a few hundred are plenty).
        test_images, test_labels: the split the accuracy change is measured on.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    directory = Path(directory)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(directory / PREDICT_FILE), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(directory / INT8_FILE),
            _Reader(np.ascontiguousarray(calibration, dtype=np.uint8)),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv", "Gemm", "MatMul"],
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    fp32, int8 = session(directory / PREDICT_FILE), session(directory / INT8_FILE)
    test_images = np.ascontiguousarray(test_images, dtype=np.uint8)
    acc32, pred32 = _accuracy(fp32, test_images, test_labels)
    acc8, pred8 = _accuracy(int8, test_images, test_labels)
    report = Int8Report(
        calibration_images=len(calibration),
        test_images=len(test_images),
        fp32_accuracy=acc32,
        int8_accuracy=acc8,
        agreement=float((pred32 == pred8).mean()),
        fp32_ms=_ms_per_image(fp32, test_images),
        int8_ms=_ms_per_image(int8, test_images),
    )
    card_path = directory / CARD_FILE
    card = json.loads(card_path.read_text())
    card["files"]["predict_int8"] = INT8_FILE
    card["int8"] = {**asdict(report), "usable": report.usable, "max_drop": MAX_ACCURACY_DROP}
    # The card says which predict graph to use: int8 only where it is both accurate and faster.
    card["files"]["predict_preferred"] = INT8_FILE if report.usable else PREDICT_FILE
    card_path.write_text(json.dumps(card, indent=2) + "\n")
    return report

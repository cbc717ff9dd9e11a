"""The student at the edge: an ONNX copy that predicts and explains without torch."""

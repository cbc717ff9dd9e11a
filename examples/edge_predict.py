"""Predict and explain with kdray's exported student: onnxruntime, numpy and Pillow only.

    python examples/edge_predict.py scan1.png scan2.jpg --model workspace/edge/brain_tumor

``--model`` is a folder ``python tune/export.py`` wrote (or the ``onnx/`` artifact of a registered
version): ``model.onnx`` + ``model.json``. For each image this prints the predicted class and its
probability, and writes into ``--out`` (default ``edge-out/``):

- ``<name>.gradcam.png``: the image with the class activation map of the predicted class over it
  (the variant the export names in ``model.json``'s ``cam_method``, HiResCAM by default; or the
  image alone and a note, when the map is blank: no location adds positive evidence);
- ``<name>.feature_maps.png``: the image, then each conv block's average feature map, first to
  last (the paper's per-layer view);
- ``predictions.json``: classes, probabilities, the class the CAM explains, and the files;
- with ``--save-maps``, ``maps.npz``: the raw maps (``feature_maps`` (N, L, S, S), ``gradcam``
  (N, S, S), float32 in [0, 1]).

Images are read as kdray reads them (first frame; 16-bit or float gray min-max scaled to 0-255;
RGB; bilinear resize to the model's input size). PNG, JPEG, BMP and TIFF; DICOM needs pydicom,
which this script does not use: convert slices first. A file that cannot be read is reported
and skipped; the exit status is 1 if any was.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

HIGH_BIT_MODES = {"I", "F", "I;16", "I;16B", "I;16L", "I;16N"}
# matplotlib's "jet" (segment data of matplotlib._cm), sampled as kdray's overlays sample it.
_JET_SEGMENTS = {
    "r": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "g": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "b": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}
_STEPS = np.linspace(0.0, 1.0, 256)
JET = np.stack(
    [np.interp(_STEPS, *zip(*_JET_SEGMENTS[c], strict=True)) for c in "rgb"], axis=1
).astype(np.float32)


def read_image(path: Path, size: int) -> np.ndarray:
    """RGB uint8 (3, size, size), as kdray.data.images.read_image makes it (DICOM aside)."""
    with Image.open(path) as image:
        image.load()  # the first frame
        if image.mode in HIGH_BIT_MODES:
            array = np.asarray(image, dtype=np.float32)
            finite = np.isfinite(array)
            if not finite.all():
                lo = float(array[finite].min()) if finite.any() else 0.0
                hi = float(array[finite].max()) if finite.any() else 0.0
                array = np.nan_to_num(array, nan=lo, posinf=hi, neginf=lo)
            lo, hi = float(array.min()), float(array.max())
            scaled = (
                ((array - lo) / (hi - lo) * 255.0).round().astype(np.uint8)
                if hi > lo
                else np.zeros(array.shape, np.uint8)
            )
            image = Image.fromarray(scaled).convert("RGB")
        elif image.mode != "RGB":
            image = image.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).copy()


def overlay(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """A [0, 1] map (H, W) in jet colours over an RGB uint8 image (H, W, 3)."""
    colours = JET[np.clip(heat * 255.0, 0, 255).astype(np.uint8)]
    out = (1.0 - alpha) * (rgb.astype(np.float32) / 255.0) + alpha * colours
    return (np.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def strip(tiles: list[np.ndarray], gap: int = 2) -> np.ndarray:
    height = tiles[0].shape[0]
    parts = []
    for tile in tiles:
        parts += [tile, np.full((height, gap, 3), 255, np.uint8)]
    return np.concatenate(parts[:-1], axis=1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    parser.add_argument("--model", required=True, type=Path, help="an export folder")
    parser.add_argument("--out", type=Path, default=Path("edge-out"), help="default: edge-out/")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0: all)")
    parser.add_argument("--save-maps", action="store_true", help="also write maps.npz")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    card_path = args.model / "model.json"
    if not card_path.is_file():
        print(f"error: {args.model} has no model.json (run tune/export.py)", file=sys.stderr)
        return 2
    card = json.loads(card_path.read_text())
    if card.get("format") != "kdray-edge/1":
        print(f"error: {card_path} is not a kdray edge export", file=sys.stderr)
        return 2
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    # The level the export checked its parity at (onnxruntime's extended fusions change the
    # CAM's hand-written backward).
    if card.get("explain_graph_optimization", "basic") == "basic":
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(
        str(args.model / card["files"]["explain"]), options, providers=["CPUExecutionProvider"]
    )
    size, classes = card["image_size"], card["class_names"]
    names = [o.name for o in session.get_outputs()]

    ok, batch, failed = [], [], []
    for path in args.images:
        try:
            batch.append(read_image(path, size))
            ok.append(path)
        except Exception as exc:  # unreadable, truncated, not an image: reported, not fatal
            failed.append({"file": str(path), "error": f"{type(exc).__name__}: {exc}"})
            print(f"error: {path}: cannot read it ({exc})", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    if ok:
        x = np.stack(batch)
        out = dict(zip(names, session.run(None, {"image": x}), strict=True))
        for i, path in enumerate(ok):
            probs = out["probabilities"][i]
            label = int(probs.argmax())
            rgb = x[i].transpose(1, 2, 0)
            cam = out["gradcam"][i]
            blank = not bool(cam.max() > 0)
            stem = f"{i:03d}-{path.stem}"
            Image.fromarray(rgb if blank else overlay(rgb, cam)).save(
                args.out / f"{stem}.gradcam.png"
            )
            tiles = [rgb] + [overlay(rgb, m, alpha=0.6) for m in out["feature_maps"][i]]
            Image.fromarray(strip(tiles)).save(args.out / f"{stem}.feature_maps.png")
            rows.append(
                {
                    "file": str(path),
                    "label": classes[label],
                    "probabilities": {c: float(p) for c, p in zip(classes, probs, strict=True)},
                    "gradcam_class": classes[int(out["cam_class"][i])],
                    "gradcam_layer": card["cam_layer"],
                    "cam_method": card.get("cam_method", "gradcam"),
                    "gradcam_blank": blank,
                    "overlays": [f"{stem}.gradcam.png", f"{stem}.feature_maps.png"],
                }
            )
            note = " (CAM blank: no location adds positive evidence)" if blank else ""
            print(f"{path}: {classes[label]} {probs[label]:.3f}{note}")
        if args.save_maps:
            np.savez_compressed(
                args.out / "maps.npz", feature_maps=out["feature_maps"], gradcam=out["gradcam"]
            )
    result = {
        "model": card.get("source", {}),
        "dataset": card["dataset"],
        "feature_layers": card["feature_layers"],
        "predictions": rows,
        "unreadable": failed,
    }
    (args.out / "predictions.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"overlays and predictions.json in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

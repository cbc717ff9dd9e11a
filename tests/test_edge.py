"""The student's ONNX export: parity with torch, refusal of a wrong graph, and the torch-free
edge script (a subprocess in which importing torch fails)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdray.data.images import read_image
from kdray.edge.export import (
    CARD_FILE,
    EXPLAIN_FILE,
    PREDICT_FILE,
    ExportError,
    Parity,
    cam_difference,
    export_student,
    session,
)
from kdray.edge.graph import NEAR_TIE, OUTPUTS, EdgeStudent, near_tie_images, window_gaps
from kdray.explain import explain, feature_maps, grad_cam
from kdray.models import ModelSpec, StudentCNN

REPO = Path(__file__).resolve().parent.parent
SIZE = 28  # blocks of 14, 7, 3 and 1 pixels: odd sides, where the pool drops a row


def _student(seed: int = 0) -> tuple[StudentCNN, ModelSpec]:
    """A student with random weights and BatchNorm statistics (not the identity of a fresh init)."""
    torch.manual_seed(seed)
    model = StudentCNN(4, [6, 8, 8, 10])
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.2)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.2)
    spec = ModelSpec("student", 4, SIZE, ["a", "b", "c", "d"], widths=[6, 8, 8, 10], dataset="x")
    return model.eval(), spec


def _images(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, SIZE, SIZE), dtype=np.uint8)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, spec = _student()
    out = tmp_path_factory.mktemp("edge") / "brain"
    return model, spec, export_student(model, spec, out, _images(24), cam_layer="features.block2")


def test_the_graph_reproduces_kdrays_maps_at_every_block():
    # The hand-written class gradient, checked in torch against pytorch-grad-cam through kdray,
    # with the CAM at each block (the last one is the head's weight row alone).
    model, _ = _student()
    x = _images(6)
    fm = feature_maps(model, x)
    for block in range(1, 5):
        with torch.no_grad():
            out = dict(zip(OUTPUTS, EdgeStudent(model, block)(torch.from_numpy(x)), strict=True))
        cam = grad_cam(model, x, f"features.block{block}")
        assert np.abs(out["logits"].numpy() - fm.logits).max() < 1e-5
        assert np.abs(out["feature_maps"].numpy() - fm.maps).max() < 1e-5
        assert np.abs(out["gradcam"].numpy() - cam.maps).max() < 1e-4, block
        assert (out["cam_class"].numpy() == cam.targets).all()
        if block < 4:  # block4 is 1x1 here: a constant map, blank in both
            assert cam.maps.max() > 0.5  # a real map, not two blank ones agreeing


def _flat_images() -> np.ndarray:
    """Images with flat regions: equal activations side by side, so a max-pool window often holds
    its maximum at several positions (synthetic fundus photos have such regions)."""
    x = np.full((3, 3, SIZE, SIZE), 128, np.uint8)
    x[1, :, 6:18, 4:20] = 220
    x[2, :, :, : SIZE // 2] = 30
    return x


def test_tied_maxima_send_the_gradient_where_torch_does(exported):
    # torch's max-pool backward sends a window's gradient to its first maximum (row by row); the
    # graph sent it to every tied one, and its CAM differed from torch's (0.97 on these images).
    model, _ = _student()
    x = _flat_images()
    for block in range(1, 4):
        with torch.no_grad():
            out = dict(zip(OUTPUTS, EdgeStudent(model, block)(torch.from_numpy(x)), strict=True))
        cam = grad_cam(model, x, f"features.block{block}")
        assert np.abs(out["gradcam"].numpy() - cam.maps).max() < 1e-4, block
    # The exported graph (CAM at block2) computes the same in onnxruntime.
    _, _, export = exported
    graph = session(export.directory / EXPLAIN_FILE)
    got = dict(zip(OUTPUTS, graph.run(None, {"image": x}), strict=True))
    cam = grad_cam(model, x, "features.block2")
    assert cam.maps.max() > 0.5  # a real map
    assert np.abs(got["gradcam"] - cam.maps).max() < 1e-4


def test_every_cam_variant_comes_exactly_from_the_graphs_gradient(tmp_path):
    """Each variant from the same hand-written gradient, at block1 (the longest backward), against
    pytorch-grad-cam's own class; the default variant also through onnxruntime at the export's
    optimisation level (its extended fusions alone put Grad-CAM at a 64 px block1 1e-2 off)."""
    from kdray.explain.cam_methods import CAM_METHODS

    model, spec = _student(3)
    x = _images(16, seed=4)
    for method in CAM_METHODS:
        with torch.no_grad():
            edge = EdgeStudent(model, 1, method)(torch.from_numpy(x))
        out = dict(zip(OUTPUTS, edge, strict=True))
        ref = grad_cam(model, x, "features.block1", None, method)
        assert np.abs(out["gradcam"].numpy() - ref.maps).max() < 1e-4, method
    export = export_student(
        model, spec, tmp_path / "hires", x, cam_layer="features.block1", cam_method="hirescam"
    )
    card = json.loads((export.directory / CARD_FILE).read_text())
    assert export.parity.ok and card["cam_method"] == "hirescam"
    assert card["explain_graph_optimization"] == "basic"


def test_export_checks_parity_and_describes_itself(exported):
    model, spec, export = exported
    assert export.parity.ok and export.parity.images == 24
    assert export.parity.gradcam <= 1e-4 and export.parity.feature_maps <= 1e-4
    card = json.loads((export.directory / CARD_FILE).read_text())
    assert card["class_names"] == spec.class_names and card["image_size"] == SIZE
    assert card["cam_layer"] == "features.block2"
    assert card["feature_layers"] == model.block_names
    assert card["opset"] == 20 and card["input"]["dtype"] == "uint8"
    assert set(card["outputs"]) == set(OUTPUTS)
    # The batch axis is dynamic: one image and an odd batch run on both graphs.
    for n in (1, 5):
        x = _images(n, seed=7)
        explain = session(export.directory / EXPLAIN_FILE).run(None, {"image": x})
        predict = session(export.directory / PREDICT_FILE).run(None, {"image": x})
        assert explain[2].shape == (n, 4, SIZE, SIZE) and explain[3].shape == (n, SIZE, SIZE)
        assert np.abs(explain[0] - predict[0]).max() < 1e-5
        with torch.no_grad():
            ref = model(torch.from_numpy(x).float() / 255).numpy()
        assert np.abs(predict[0] - ref).max() < 1e-4


def test_maps_and_outputs_have_their_own_tolerance():
    def parity(**worst: float) -> Parity:
        return Parity(
            8,
            **{
                **dict.fromkeys(("logits", "probabilities", "feature_maps", "gradcam"), 0.0),
                **worst,
            },
            labels_equal=True,
        )

    assert parity(gradcam=5e-4).ok and parity(feature_maps=9e-4).ok  # under a grey level's quarter
    assert not parity(gradcam=2e-3).ok and not parity(feature_maps=2e-3).ok
    assert not parity(logits=5e-4).ok and not parity(probabilities=5e-4).ok
    assert not Parity(8, 0.0, 0.0, 0.0, 0.0, labels_equal=False).ok
    # Near-tie images' CAMs are reported, not judged; but a quarter must be free of them.
    assert parity(near_tie_images=6, gradcam_near_ties=0.03).ok
    assert not parity(near_tie_images=7).ok and not parity(near_tie_images=8).ok
    assert "fewer than a quarter" in parity(near_tie_images=7).describe()


def test_near_ties_are_found_where_rounding_can_move_the_gradient():
    # One image, one channel, three 2x2 windows: a near tie (two float32 steps below 1), an exact
    # tie (resolved as torch does), a clear maximum; then a window of zeros only (the ReLU's cut).
    act = torch.tensor([[[[1.0, 0.99999988, 0.5, 0.5, 0.9, 0.1], [0.2, 0.1, 0.1, 0.0, 0.2, 0.3]]]])
    assert 0 < window_gaps(act)[0] < NEAR_TIE
    assert float(window_gaps(act[..., 2:])[0]) == pytest.approx(0.6 / 0.9, rel=1e-5)
    assert window_gaps(torch.zeros(1, 1, 2, 2))[0] == float("inf")
    assert window_gaps(torch.tensor([[[[0.5, 0.5], [0.1, 0.0]]]]))[0] == float("inf")
    # Only the max-pools behind the CAM's block count: none behind the last block.
    model, _ = _student()
    x = torch.from_numpy(_images(6))
    assert not near_tie_images(model, x, 4, rel=float("inf")).any()
    assert near_tie_images(model, x, 3, rel=float("inf")).all()
    assert not near_tie_images(model, x, 1, rel=0.0).any()
    assert NEAR_TIE < 1e-5  # a near tie is float32 rounding, not a close call


def test_the_cam_is_judged_on_the_images_without_a_near_tie(monkeypatch):
    import kdray.edge.export as export_module

    model, _ = _student()
    x = _images(4)
    want = np.random.default_rng(0).random((4, SIZE, SIZE)).astype(np.float32)
    got = want.copy()
    got[2] += 0.5
    assert cam_difference(model, "features.block2", x, got, want)[0] == pytest.approx(
        0.5
    )  # none near: judged
    monkeypatch.setattr(
        export_module,
        "near_tie_images",
        lambda student, images, cam_block: torch.tensor([False, False, True, False]),
    )
    assert cam_difference(model, "features.block2", x, got, want) == (0.0, 1, pytest.approx(0.5))


def test_a_graph_that_explains_wrongly_is_refused(tmp_path, monkeypatch):
    # Mirror the gradient each block passes down: the CAM drifts, the export fails and leaves
    # no folder behind.
    model, spec = _student()
    original = EdgeStudent._backward_block

    def mirrored(self, block, x_in, grad_out):
        return original(self, block, x_in, grad_out.flip(-1))

    monkeypatch.setattr(EdgeStudent, "_backward_block", mirrored)
    with pytest.raises(ExportError, match="do not match torch") as caught:
        export_student(model, spec, tmp_path / "out", _images(16), cam_layer="features.block1")
    assert caught.value.parity.gradcam > 1e-2  # the CAM is what drifted
    assert caught.value.parity.logits < 1e-4 and caught.value.parity.feature_maps < 1e-4
    assert not (tmp_path / "out").exists()


_NO_TORCH = """
import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "ray", "mlflow", "kdray", "torchvision"}:
            raise ImportError(f"{name} is not on the edge device")
sys.meta_path.insert(0, Block())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_edge_script_predicts_and_explains_without_torch(exported, tmp_path):
    model, spec, export = exported
    files = []
    rng = np.random.default_rng(3)
    rgb = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)).save(rgb)
    gray16 = tmp_path / "slice16.png"  # 16-bit gray: min-max scaled as kdray scales it
    Image.fromarray(rng.integers(100, 4000, (SIZE, SIZE), dtype=np.uint16)).save(gray16)
    jpeg = tmp_path / "scan.jpg"
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)).save(jpeg, quality=90)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    files = [rgb, gray16, broken, jpeg]
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, str(REPO / "examples" / "edge_predict.py")]
        + [str(f) for f in files]
        + ["--model", str(export.directory), "--out", str(out), "--save-maps"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr  # one file was unreadable
    assert "broken.png" in proc.stderr
    result = json.loads((out / "predictions.json").read_text())
    assert [r["file"] for r in result["unreadable"]] == [str(broken)]
    read = [f for f in files if f != broken]
    assert [r["file"] for r in result["predictions"]] == [str(f) for f in read]

    x = np.stack([read_image(f, SIZE) for f in read])  # kdray's own decoder
    fm = feature_maps(model, x)
    cam = grad_cam(model, x, "features.block2")
    probs = torch.softmax(torch.from_numpy(fm.logits), 1).numpy()
    edge_probs = np.array(
        [[r["probabilities"][c] for c in spec.class_names] for r in result["predictions"]]
    )
    assert np.abs(edge_probs - probs).max() <= 1e-4
    assert [r["label"] for r in result["predictions"]] == [
        spec.class_names[i] for i in probs.argmax(1)
    ]
    maps = np.load(out / "maps.npz")
    assert np.abs(maps["feature_maps"] - fm.maps).max() <= 1e-4
    assert np.abs(maps["gradcam"] - cam.maps).max() <= 1e-4
    for row in result["predictions"]:
        for name in row["overlays"]:
            assert Image.open(out / name).size[1] == SIZE


def test_int8_predict_graph_is_reported_never_assumed(exported, tmp_path):
    import shutil

    from kdray.edge.quantize import INT8_FILE, quantize_predict

    _, _, export = exported
    folder = Path(shutil.copytree(export.directory, tmp_path / "copy"))
    labels = np.random.default_rng(0).integers(0, 4, 48)
    report = quantize_predict(folder, _images(64, seed=5), _images(48, seed=6), labels)
    card = json.loads((folder / CARD_FILE).read_text())
    assert card["files"]["predict_int8"] == INT8_FILE
    assert card["int8"]["test_images"] == 48
    assert card["files"]["predict_preferred"] in (INT8_FILE, PREDICT_FILE)
    assert (card["files"]["predict_preferred"] == INT8_FILE) == report.usable
    x = _images(48, seed=6)
    int8 = session(folder / INT8_FILE).run(["logits"], {"image": x})[0]
    fp32 = session(folder / PREDICT_FILE).run(["logits"], {"image": x})[0]
    assert report.agreement == pytest.approx(float((int8.argmax(1) == fp32.argmax(1)).mean()))
    assert np.corrcoef(int8.ravel(), fp32.ravel())[0, 1] > 0.9  # quantised, not broken


def test_the_server_predicts_on_onnx_only_where_the_export_matches_torch(tmp_path):
    # The registry path the Serve Gateway takes (ModelStore, runtime: onnx): a version without an
    # export predicts with torch, one with a matching export with onnxruntime, and one whose
    # export no longer matches its torch weights falls back to torch, saying why.
    from kdray.config import MLflowConfig
    from kdray.edge.publish import export_registered
    from kdray.models import save_model
    from kdray.registry import log_model_folder, register_model
    from kdray.serving.store import ModelStore
    from kdray.tracking import Tracker
    from kdray.workspace import Workspace

    ws = Workspace(tmp_path / "ws").create()
    tracker = Tracker.open(MLflowConfig(), ws)
    model, spec = _student(seed=2)
    spec.dataset = "brain_tumor"
    run_id = tracker.start_run("champion", "brain_tumor", "champion")
    log_model_folder(tracker.client, run_id, save_model(model, spec, tmp_path / "m"))
    register_model(tracker.client, "kdray-brain_tumor", run_id, "champion")

    def student():
        store = ModelStore(
            tracker.tracking_uri,
            ["brain_tumor"],
            "champion",
            ("student",),
            runtime="onnx",
            explain_graph=True,  # what the Explainer deployment asks for with runtime: onnx
        )
        try:
            assert store.ready(), store.errors()
            return store.get("brain_tumor")
        finally:
            store.close()

    loaded = student()
    assert loaded.onnx is None and "no ONNX export" in loaded.runtime_note
    assert loaded.explain_graph is None and "no ONNX export" in loaded.explain_note

    export_registered(
        "kdray-brain_tumor", "champion", _images(8), tmp_path / "edge", tracker.tracking_uri
    )
    loaded = student()
    assert loaded.runtime_note.startswith("onnx")
    x = [img for img in _images(5, seed=9)]
    with torch.no_grad():
        ref = torch.softmax(model(torch.from_numpy(np.stack(x)).float() / 255), 1).numpy()
    assert np.abs(np.array(loaded.onnx.probabilities(x)) - ref).max() <= 1e-5
    assert loaded.explain_note.startswith("onnx")
    # A version without a measured CAM is exported with the variant explain() uses by default
    # for it, so the graph answers the default request (it once computed Grad-CAM while the
    # explainers asked for HiResCAM, and every request fell back to torch).
    passes, run = [], loaded.explain_graph.run
    loaded.explain_graph.run = lambda image: passes.append(1) or run(image)
    for image in x[:2]:  # the Explainer's maps from the graph are kdray's torch maps
        ours = explain(model, image, ["feature_maps", "gradcam"], render="none")
        graphs = explain(
            model, image, ["feature_maps", "gradcam"], render="none", graph=loaded.explain_graph
        )
        assert graphs.prediction == ours.prediction
        for method in ("feature_maps", "gradcam"):
            for a, b in zip(ours.methods[method].maps, graphs.methods[method].maps, strict=True):
                assert a.layer == b.layer and np.abs(a.array - b.array).max() <= 1e-4
    assert len(passes) == 2  # both answered from the graph

    # Another model's graph logged over this version's export: caught at load.
    other, _ = _student(seed=3)
    stale = export_student(other, spec, tmp_path / "stale", _images(8))
    tracker.client.log_artifacts(run_id, str(stale.directory), "onnx")
    loaded = student()
    assert loaded.onnx is None and "differs from the torch weights" in loaded.runtime_note
    assert loaded.explain_graph is None and "differs from torch" in loaded.explain_note


def test_explain_takes_the_graph_only_for_what_it_computes(exported):
    """explain(graph=...) answers from the ONNX pass only for the prediction's Grad-CAM at the
    graph's layer and every block's mean map; a target, top-k channels or another layer go to
    torch (the graph is never called)."""
    from kdray.config import ExplainConfig
    from kdray.edge.runtime import OnnxExplainer

    model, _, export = exported
    card = json.loads((export.directory / CARD_FILE).read_text())
    graph = OnnxExplainer(session(export.directory / EXPLAIN_FILE), card)
    calls = []

    class Spy:
        feature_layers, cam_layer = graph.feature_layers, graph.cam_layer
        cam_method = graph.cam_method

        def run(self, image):
            calls.append(image.shape)
            return graph.run(image)

    image = _images(1, seed=11)[0]
    methods = ["feature_maps", "gradcam"]
    own = {"cam_method": card["cam_method"]}  # the variant the graph computes (Grad-CAM here)
    torch_maps = explain(model, image, methods, render="none", cam_layer="features.block2", **own)
    graph_maps = explain(model, image, methods, render="none", graph=Spy(), **own)
    assert calls == [(1, 3, SIZE, SIZE)]
    for method in methods:
        for a, b in zip(
            torch_maps.methods[method].maps, graph_maps.methods[method].maps, strict=True
        ):
            assert a.layer == b.layer and np.abs(a.array - b.array).max() <= 1e-4
    for kwargs in (
        {"target": 1, **own},
        {"cfg": ExplainConfig(top_k_channels=2), **own},
        {"cam_layer": "features.block1", **own},
        {"feature_layers": ["features.block1"], **own},
        {"cam_method": "hirescam"},  # another variant than the graph's
    ):
        explain(model, image, methods, render="none", graph=Spy(), **kwargs)
    explain(model, image.astype(np.float32) / 255, methods, render="none", graph=Spy(), **own)
    assert len(calls) == 1  # none of those took the graph


def test_datasets_exporting_at_once_both_get_a_checked_export(tmp_path):
    # A run's datasets may finish at once (ray.max_concurrent_datasets): their exports meet in
    # one process, and torch.export's state is process-wide.
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(_student(seed)[0], _student(seed)[1], tmp_path / f"d{seed}") for seed in (4, 5)]
    with ThreadPoolExecutor(2) as pool:
        exports = list(
            pool.map(lambda job: export_student(job[0], job[1], job[2], _images(8)), jobs)
        )
    for export, (model, _, folder) in zip(exports, jobs, strict=True):
        assert export.parity.ok and export.directory == folder
        x = _images(3, seed=8)
        with torch.no_grad():
            ref = model(torch.from_numpy(x).float() / 255).numpy()
        logits = session(folder / PREDICT_FILE).run(["logits"], {"image": x})[0]
        assert np.abs(logits - ref).max() < 1e-4  # each folder holds its own model


def test_the_services_load_check_of_the_graph_follows_the_export_rule(exported, monkeypatch):
    import kdray.edge.export as export_module
    from kdray.edge.runtime import load_onnx_explainer

    model, _, export = exported
    card = json.loads((export.directory / CARD_FILE).read_text())
    background = _images(4, seed=12)
    graph, note = load_onnx_explainer((export.directory, card), model, background=background)
    assert graph is not None and note.startswith("onnx"), note
    # Every checked image with a near tie: nothing left to hold the CAM to, so torch explains.
    monkeypatch.setattr(
        export_module,
        "near_tie_images",
        lambda student, images, cam_block: torch.ones(len(images), dtype=torch.bool),
    )
    graph, note = load_onnx_explainer((export.directory, card), model, background=background)
    assert graph is None and "could not be checked" in note and "6 of 6" in note

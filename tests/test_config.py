from __future__ import annotations

from pathlib import Path

import pytest

from kdray.cli import main
from kdray.config import ConfigError, load_config

REPO = Path(__file__).resolve().parent.parent


def test_shipped_configs_load():
    default = load_config(REPO / "configs" / "default.yaml")
    smoke = load_config(REPO / "configs" / "smoke.yaml")
    assert default.data.datasets == ["brain_tumor", "eye_disease", "alzheimer"]
    assert smoke.teacher.epochs < default.teacher.epochs
    assert default.student.resolved_widths() == [16, 32, 64, 128, 128]
    assert (
        default.seeds == [0, 1, 2] and smoke.seeds == []
    )  # the default shows spread; smoke is quick
    paper = load_config(REPO / "configs" / "paper.yaml")
    assert paper.teacher.epochs > default.teacher.epochs and paper.teacher.schedule == "cosine"
    assert paper.student == default.student  # only the teacher and the data differ
    load_config(REPO / "configs" / "cluster.yaml")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("teacher.foo=1", "teacher.foo"),
        ("bogus=1", "bogus"),
        ("teacher.epochs=many", "teacher.epochs"),
        ("kd.alpha=1.5", "kd.alpha"),
        ("kd.alpha=-0.1", "kd.alpha"),
        ("kd.temperature=0", "kd.temperature"),
        ("kd.temperature=-2", "kd.temperature"),
        ("tune.alpha=[0.2, 1.3]", "tune.alpha"),
        ("data.datasets=[brain_tumor, lung_xray]", "data.datasets"),
        ("student.widths=[8, 16]", "student"),
        ("data.synthetic.student_fraction=0", "data.synthetic.student_fraction"),
        ("data.synthetic.student_fraction=1.5", "data.synthetic.student_fraction"),
    ],
)
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / "smoke.yaml", [override])
    assert f"  {key}:" in str(err.value)


def test_overrides_are_parsed_as_yaml():
    cfg = load_config(
        None,
        [
            "kd.alpha=0.25",
            "data.datasets=[alzheimer]",
            "teacher.weights=null",
            "student.widths=[4, 8, 8, 16, 16]",
        ],
    )
    assert cfg.kd.alpha == 0.25
    assert cfg.data.datasets == ["alzheimer"]
    assert cfg.teacher.weights is None
    assert cfg.student.resolved_widths() == [4, 8, 8, 16, 16]


def test_width_pattern():
    from kdray.config import widths_for

    assert widths_for(16, 2.0, 5) == [16, 32, 64, 128, 128]
    assert widths_for(8, 1.5, 6) == [8, 12, 18, 27, 27, 27]
    cfg = load_config(None, ["student.base_width=8", "student.depth=4"])
    assert cfg.student.resolved_widths() == [8, 16, 32, 64]


def test_override_into_a_value_is_rejected():
    with pytest.raises(ConfigError, match="kd.alpha is a value"):
        load_config(None, ["kd.alpha.x=1"])
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["kd.alpha"])


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cli_rejects_bad_config_before_any_work(tmp_path, capsys):
    ws = tmp_path / "ws"
    code = main(
        [
            "--config",
            str(REPO / "configs" / "smoke.yaml"),
            "--workspace",
            str(ws),
            "--set",
            "kd.temperature=0",
        ]
    )
    assert code == 2
    assert "kd.temperature" in capsys.readouterr().err
    assert not ws.exists()  # nothing was created


def test_workspace_resolution(monkeypatch, tmp_path):
    from kdray.workspace import resolve_workspace

    monkeypatch.setenv("KDRAY_HOME", str(tmp_path / "home"))
    assert resolve_workspace() == (tmp_path / "home").resolve()
    assert resolve_workspace(tmp_path / "x") == (tmp_path / "x").resolve()
    monkeypatch.delenv("KDRAY_HOME")
    monkeypatch.chdir(tmp_path)
    assert resolve_workspace() == (tmp_path / "workspace").resolve()


def test_tracking_uri_resolution(monkeypatch, tmp_path):
    from kdray.config import MLflowConfig
    from kdray.tracking import resolve_tracking_uri
    from kdray.workspace import Workspace

    ws = Workspace(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(MLflowConfig(), ws) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(MLflowConfig(), ws) == "http://127.0.0.1:5000"
    assert (
        resolve_tracking_uri(MLflowConfig(tracking_uri="sqlite:////x.db"), ws) == "sqlite:////x.db"
    )


def test_default_yaml_spells_out_the_code_defaults():
    from kdray.config import ExperimentConfig

    assert (
        load_config(REPO / "configs" / "default.yaml").model_dump()
        == ExperimentConfig().model_dump()
    )

"""`make`'s installer (tools/install.py): uv, configured from pip's configuration."""

from __future__ import annotations

import importlib.util

from conftest import REPO


def _installer():
    spec = importlib.util.spec_from_file_location("install", REPO / "tools" / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pips_configuration_becomes_uvs_options_with_pips_precedence():
    install = _installer()
    listed = "\n".join(
        [
            "global.cert='/etc/ssl/certs/ca.crt'",
            "global.constraint='/etc/pip/constraints.txt'",
            "global.extra-index-url='file:///opt/a/simple file:///opt/b/simple'",
            "global.find-links='/opt/global-wheels'",
            "global.index-url='https://mirror.example/simple'",
            "install.index-url='https://install.example/simple'",  # install over global
            ":env:.find-links='/opt/wheels'",  # PIP_FIND_LINKS over both
            ":env:.default-timeout='180'",
            "not a config line",
        ]
    )
    config = install.pip_config(listed)
    assert config["find-links"] == "/opt/wheels"
    assert config["index-url"] == "https://install.example/simple"
    args, env = install.uv_options(config)
    assert args == [
        "--index-strategy",
        "unsafe-best-match",  # the best version over every index, as pip chooses
        "--index-url",
        "https://install.example/simple",
        "--extra-index-url",
        "file:///opt/a/simple",
        "--extra-index-url",
        "file:///opt/b/simple",
        "--find-links",
        "/opt/wheels",
        "--constraint",
        "/etc/pip/constraints.txt",
    ]
    assert env == {"SSL_CERT_FILE": "/etc/ssl/certs/ca.crt", "UV_HTTP_TIMEOUT": "180"}
    assert install.uv_options({"no-index": "true"})[0][-1] == "--no-index"


def test_make_installs_through_it():
    makefile = (REPO / "Makefile").read_text()
    assert "$(PY) tools/install.py -e '.[dev]'" in makefile
    assert "pip install" not in makefile.replace("tools/install.py", "")

"""The service's auth fails closed, its errors never show the tracking URI, its stores clean up.

Unit tests (no Ray): the settings and the replicas' constructors are what `serve run` and
`serve deploy` execute on each replica.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from unittest import mock

import pytest

from kdray.config import ConfigError
from kdray.serving.settings import load_settings
from kdray.serving.store import ModelStore, redact

VAR = "KDRAY_TEST_AUTH_TOKEN_VAR"


def _user_class(deployment):
    """The class under ``@serve.deployment`` (``@serve.ingress`` wraps it in a subclass with an
    async ``__init__`` and the same name)."""
    return next(
        c
        for c in deployment.func_or_class.__mro__
        if c.__module__.startswith("kdray.")
        and "__init__" in vars(c)
        and not inspect.iscoroutinefunction(vars(c)["__init__"])
    )


def test_auth_token_is_the_default_and_a_missing_or_blank_variable_is_an_error(monkeypatch):
    monkeypatch.delenv(VAR, raising=False)
    settings = load_settings({"token_env": VAR})
    assert settings.auth == "token"
    with pytest.raises(ConfigError, match=rf"\${VAR} is not set .*args.auth: none"):
        settings.token()
    monkeypatch.setenv(VAR, "  ")
    with pytest.raises(ConfigError, match=rf"\${VAR} is empty"):
        settings.token()
    monkeypatch.setenv(VAR, "s3cret")
    assert settings.token() == "s3cret"
    assert "s3cret" not in settings.auth_mode() and VAR in settings.auth_mode()


def test_auth_none_is_an_explicit_choice(monkeypatch):
    monkeypatch.delenv(VAR, raising=False)
    settings = load_settings({"token_env": VAR, "auth": "none"})
    assert settings.token() is None
    assert "auth: none" in settings.auth_mode()
    with pytest.raises(ConfigError, match="args.auth"):
        load_settings({"auth": "maybe"})


def test_a_gateway_replica_without_its_token_refuses_to_start(monkeypatch):
    """Before it loads a model: the constructor raises, Serve reports the deployment failed."""
    from kdray.serving.app import Gateway

    monkeypatch.delenv(VAR, raising=False)
    with (
        mock.patch("kdray.serving.gateway.ModelStore") as store,
        pytest.raises(ConfigError, match=VAR),
    ):
        _user_class(Gateway)(None, None, {"token_env": VAR})
    store.assert_not_called()


def test_errors_never_show_a_uri():
    uri = "postgresql://kdray:hunter2@db.internal:5432/mlflow"
    text = f"OperationalError: could not connect to {uri}; also see http://x.internal/a?b=c"
    cleaned = redact(text, uri)
    assert "hunter2" not in cleaned and "db.internal" not in cleaned and "x.internal" not in cleaned
    assert cleaned.startswith("OperationalError: could not connect to <tracking uri>")


def test_a_failed_load_leaves_no_folder_and_no_uri(tmp_path):
    uri = f"sqlite:///{tmp_path / 'missing' / 'deeper' / 'mlflow.db'}"
    store = ModelStore(uri, ["brain_tumor"], "champion", ("student",))
    try:
        assert not store.ready()
        errors = store.errors()
        assert errors and all(str(tmp_path) not in e for e in errors.values())
        for _ in range(3):
            store.retry_missing(min_interval_s=0.0)
        assert list(Path(store._dir).iterdir()) == []  # each attempt's folder went with it
    finally:
        store.close()
    assert not Path(store._dir).exists()


def test_replicas_close_their_stores_when_serve_shuts_them_down():
    from kdray.serving.app import Gateway
    from kdray.serving.deployments import Explainer

    gateway = object.__new__(_user_class(Gateway))
    gateway.predictor = mock.Mock()
    gateway.__del__()
    gateway.predictor.store.close.assert_called_once()
    explainer = object.__new__(_user_class(Explainer))
    explainer.store = mock.Mock()
    explainer.__del__()
    explainer.store.close.assert_called_once()
    object.__new__(_user_class(Gateway)).__del__()  # a replica whose __init__ failed

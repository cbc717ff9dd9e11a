"""The kdray HTTP service as a Ray Serve application builder.

``serve run serve/config.yaml`` (or ``make serve``) imports ``build_app`` from here; the code is
:mod:`kdray.serving`, so the same application is ``kdray.serving.app:build_app`` wherever kdray
is installed (e.g. ``serve deploy`` to a cluster without this checkout).
"""

from kdray.serving.app import build_app

__all__ = ["build_app"]

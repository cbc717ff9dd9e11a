"""Ray Serve entry point: ``serve run serve/config.yaml`` (see ``serve/app.py``)."""

"""The HTTP service: registered champions (and teachers) behind Ray Serve.

- :mod:`kdray.serving.settings`: the application ``args`` (strict, like the experiment config);
- :mod:`kdray.serving.store`: models loaded from the MLflow registry by name@alias;
- :mod:`kdray.serving.uploads`: request bodies within limits, decoded before any model runs;
- :mod:`kdray.serving.deployments`: the batched predictor (in the ingress) and the Explainer deployments;
- :mod:`kdray.serving.app`: the FastAPI gateway and ``build_app``.
"""

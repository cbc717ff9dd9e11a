"""The HTTP service: registered champions (and teachers) behind Ray Serve.

- :mod:`kdray.serving.settings`: the application ``args`` (strict, like the experiment config);
- :mod:`kdray.serving.store`: models loaded from the MLflow registry by name@alias;
- :mod:`kdray.serving.uploads`: request bodies within limits, decoded before any model runs;
- :mod:`kdray.serving.deployments`: the batched predictor (in the ingress) and the Explainer deployments;
- :mod:`kdray.serving.errors`: every answer that is not a success as a JSON ``ErrorBody``;
- :mod:`kdray.serving.timings`: the ``Server-Timing`` header of a request;
- :mod:`kdray.serving.gateway`: the Gateway replica's state and the helpers its routes share;
- :mod:`kdray.serving.app`: the FastAPI gateway's routes and ``build_app``.
"""

"""Deployment artefacts generated from the project's own configs.

- :mod:`kdray.deploy.kuberay`: the KubeRay RayService's ``serveConfigV2`` from ``serve/config.yaml``
  (``python -m kdray.deploy.kuberay [--check]``).
"""

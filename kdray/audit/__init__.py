"""Audit a whole dataset on Ray Data (``tune/audit.py``): every image predicted and explained by
student and teacher, scored, and the cases to look at first. See :mod:`kdray.audit.run`."""

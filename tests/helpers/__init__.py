"""Reusable test helpers (no tests here). ``tests.helpers.containerd``: a private containerd."""

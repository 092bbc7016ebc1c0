"""Federated methods, one file each. ``hetlora`` is the paper's method."""

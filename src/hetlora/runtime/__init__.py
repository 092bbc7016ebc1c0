"""Runtimes that drive the method: ``local`` (in-process simulation, the default)."""

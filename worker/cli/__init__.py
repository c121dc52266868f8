"""Command-line entry points: ``sam-worker``, ``sam-admin`` and ``sam``."""

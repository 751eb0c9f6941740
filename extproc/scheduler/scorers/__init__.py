"""Scorer plugins, one module each; registered by name in ``extproc/scheduler/registry.py``.

Each rates the candidates of one version 0..1, higher is better (``interfaces.Scorer``). Unknown
readings (no data, stale) score ``NEUTRAL``, never as idle nor as loaded: a version's candidates
all share one health level after ``prefer-fresh``, so only the in-flight terms and the rotation
separate them then.
"""

NEUTRAL = 0.5

"""The endpoint scheduler: filter, scorer and selector plugins composed by a profile (docs/scheduler.md).

Per request the servicer calls ``picker.Picker.pick`` and gets a ``results.Pick`` (hosts for
``envoy.lb``), or a refusal whose ``error()`` is the ``RequestError`` to answer with.

This file imports nothing: the control plane imports ``registry`` (names only) through it.
"""

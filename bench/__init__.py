"""Benchmarks, run by `make bench` (`python -m bench`); never part of `make test`.

Convention for a benchmark module ``bench/NAME.py`` (a leading underscore marks a helper, not a
benchmark):

* ``run(out_dir: pathlib.Path) -> str``: run, write any PNG plots into ``out_dir`` (``docs/``)
  and return a markdown section (no top-level heading: the runner adds ``## TITLE``); links to
  plots are relative to ``out_dir``;
* optional ``TITLE`` (defaults to the module name) and ``ORDER`` (an int; lower runs first,
  default 100, then by name);
* bounded: a few minutes at most; with ``IMESH_BENCH_QUICK=1`` (``python -m bench --quick``)
  fewer and shorter runs;
* every figure is a ratio or a comparison taken in the same run on the same machine; traffic
  only to 127.0.0.1.

``python -m bench`` runs every such module and assembles ``docs/benchmarks.md``.
"""

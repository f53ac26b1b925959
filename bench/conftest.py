"""Benchmarks (pytest-benchmark): ``python -m pytest bench --benchmark-only``.

Every benchmark body checks its result (a fast wrong kernel must not win) and records the
instruction set, threads and bytes moved in ``extra_info``.  Timings never go into tests/.
"""

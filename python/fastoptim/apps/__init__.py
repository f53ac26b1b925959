"""The applications of the ``fastoptim`` command, built on the library: :mod:`~.cli` (the
command line), :mod:`~.demo` (a NumPy MLP trained once per optimizer), :mod:`~.minimize` (test
functions), :mod:`~.bench` (benchmarks) and :mod:`~.mlp` (the demo's network).  Nothing in the
library imports them."""

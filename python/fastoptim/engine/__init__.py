"""fastoptim's engine: what every tier shares, written once.

- :mod:`.definition`: :class:`~.definition.Definition`, what defines an optimizer
  (hyper-parameters and their rules, state buffers, the compiled kernel, docs);
  :mod:`fastoptim.definitions` holds one per optimizer.
- :mod:`.scheduled`: the schedules of a parameter group (adopting, evaluating, advancing,
  validating, restoring), for the NumPy and PyTorch tiers alike.
- :mod:`.optimizer`: the NumPy tier's :class:`~.optimizer.Optimizer` (groups, state arenas,
  plans, the step, state_dict).
- :mod:`.functional`: the functional tier's one update.
- :mod:`.codegen`: generates every tier's typed classes and functions from the definitions.
"""

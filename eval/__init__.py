"""SuperInfer's evaluation: scripts that answer one question each (see eval/README.md).

Run them as modules from the repository root, e.g. ``python -m eval.sim_policy --help``.
"""

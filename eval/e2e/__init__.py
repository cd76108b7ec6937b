"""The parts of ``python -m eval.e2e_rotation``: which servers it starts, how it reads the
rotator's stats records, how it compares outputs, and how it reports."""

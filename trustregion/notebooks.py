"""The one parameter of the example notebooks: how big a run they do.

Every notebook in ``examples/notebooks/`` starts with::

    from trustregion.notebooks import notebook_size
    SIZE = notebook_size()

and picks its number of rollout batches, seeds and prompts from ``SIZE``. The environment
variable ``TRUSTREGION_NOTEBOOK_SIZE`` sets it:

* ``full`` (the default) — the run whose outputs are committed with the notebook;
* ``reduced`` — the same lesson, every cell executed, at a size that keeps the test suite quick.
  The test suite runs every notebook this way.

>>> import os
>>> os.environ["TRUSTREGION_NOTEBOOK_SIZE"] = "reduced"
>>> notebook_size()
'reduced'
>>> os.environ["TRUSTREGION_NOTEBOOK_SIZE"] = "tiny"
>>> notebook_size()
Traceback (most recent call last):
    ...
ValueError: TRUSTREGION_NOTEBOOK_SIZE='tiny' is not a notebook size; allowed: 'full' ...
>>> del os.environ["TRUSTREGION_NOTEBOOK_SIZE"]
"""

from __future__ import annotations

import os

__all__ = ["NOTEBOOK_SIZES", "SIZE_VARIABLE", "notebook_size"]

SIZE_VARIABLE = "TRUSTREGION_NOTEBOOK_SIZE"
"""The environment variable that sets the notebooks' size."""

NOTEBOOK_SIZES = ("full", "reduced")
"""The allowed sizes; the first is the default."""


def notebook_size() -> str:
    """The size the notebooks run at: ``"full"`` or ``"reduced"``, from
    ``TRUSTREGION_NOTEBOOK_SIZE`` (default ``"full"``). Raises ``ValueError`` on anything else."""
    value = os.environ.get(SIZE_VARIABLE, NOTEBOOK_SIZES[0]).strip()
    if value not in NOTEBOOK_SIZES:
        raise ValueError(
            f"{SIZE_VARIABLE}={value!r} is not a notebook size; allowed: 'full' (the default, "
            "the committed run) or 'reduced' (the test suite's quick run)")
    return value

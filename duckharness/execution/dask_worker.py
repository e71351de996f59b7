"""Set-up of the workers of a local Dask cluster the ``dask`` executor starts itself (never of a
user's own cluster): a Dask preload module, run by each worker as it starts."""

from __future__ import annotations

import logging
from typing import Any


def _not_a_failed_task(record: logging.LogRecord) -> bool:
    # distributed logs each task that raises ("Compute Failed", with its traceback) on the worker's
    # stderr; the executor gets the same error back with the task's result and reports it once.
    return not str(record.msg).startswith("Compute Failed")


def dask_setup(worker: Any) -> None:
    """Keep the worker's log quiet about tasks that raise (the run reports them) and about the
    tasks a Ctrl-C cancels ("Async instruction ... ended with CancelledError")."""
    logging.getLogger("distributed.worker").addFilter(_not_a_failed_task)
    logging.getLogger("distributed.worker.state_machine").setLevel(logging.ERROR)

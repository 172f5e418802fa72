"""ExecutionOptions: how a run uses the cluster and the store."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from .exceptions import InvalidArgumentError

__all__ = ["ExecutionOptions"]


@dataclass(frozen=True)
class ExecutionOptions:
    """How a many-model run is executed.

    Parameters
    ----------
    npartitions : int, optional
        Number of tasks the groups are shuffled into (largest groups first,
        balanced by rows). Default: about four tasks per worker thread,
        never more than the number of groups; when the input is already
        partitioned by the group columns, nothing is shuffled and each input
        partition is a task, a large one (more than 1.5 times a task's share
        of the rows) split into several (see ``shuffle``). Giving a number
        always shuffles.
    resources : dict, optional
        Dask worker resources every user-function task needs, e.g.
        ``{"GPU": 1}``. The shuffle before it does not carry them.
    max_retries : int
        How many more times a group whose function raised is run again
        before it is marked FAILED.
    fail_fast : bool
        After the first FAILED group, stop the rest of the run (CANCELLED).
        A group that ends INTERNAL_ERROR as it runs (too big for its worker,
        its model refused by the store where the serde writes it at once)
        stops it too; one whose model fails to go out with its task's batch
        of small writes (see ``storage_retries``) is marked when the batch is
        written, and does not.
    storage_retries : int
        How many times each object write or read is retried on ``OSError``,
        with exponential backoff starting at ``storage_retry_backoff`` seconds.
        On an object store a task's small files are first written together in
        one batch; if the batch fails, each file is then written alone with
        these retries (so a file may be tried once more than this says).
        Once a file of such a batch has failed every retry, the batch's next
        files get one try each until one is written (a store that went down
        would otherwise take the backoff again for every file).
    storage_retry_backoff : float
        First backoff delay in seconds.
    shuffle : str
        ``"auto"`` (default): skip the shuffle when every group already
        lives in one input partition (``set_index`` on the key, a
        hive-partitioned dataset, data written per group) and the input
        partitions are balanced enough; then each group runs in a task of
        its own input partition (a large partition split into several
        tasks). ``"always"``, or an explicit ``npartitions``: shuffle.
        ``"never"``: do not shuffle, and refuse input where a group is split
        across partitions.
    shuffle_method : str, optional
        ``"p2p"``, ``"tasks"`` or ``"disk"``; default is Dask's own choice
        (``dataframe.shuffle.method`` in its config, else p2p), except for
        an input with columns of Python objects (object dtype): ``"tasks"``,
        as p2p sends rows through Arrow, which fails on tuples and mixed
        types and turns lists into arrays. Ask for ``"p2p"`` (it spills to
        disk; ``tasks`` holds the rows in memory) where those columns hold
        strings only, as with pandas 2 and Dask's ``convert-string`` off.
    max_log_chars : int
        Cap on the captured logs kept per group (a note marks the cut).
    task_retries : int
        Dask-level retries of a whole task whose function raised (a store
        that still failed after ``storage_retries``, a bug). A task whose
        worker died is run again by Dask's own rule instead,
        ``distributed.scheduler.allowed-failures`` (see "Faults" in
        docs/concepts.md).
    max_group_memory_fraction : float or None
        A group whose rows take more than this fraction of its worker's
        memory limit is not run: it becomes INTERNAL_ERROR with its size,
        instead of taking the worker down. In a run that must shuffle, a
        group is refused before the shuffle when its estimated size (its
        rows times its input partitions' bytes per row) passes this fraction
        of the smallest worker limit divided by the copies the shuffle holds
        (3 with ``tasks`` or ``disk``, 6 with ``p2p``; see ``shuffle_method``;
        measured): a group too big killed the shuffle's workers, and every
        group of the run was lost with them. None turns the checks off.
    reuse_freed_memory : bool
        While a task runs, let glibc keep freed memory for reuse, and give
        it back when the task ends. Dask's nanny starts workers with
        ``MALLOC_TRIM_THRESHOLD_=65536``, which made small pandas and numpy
        fits 25-35% slower there (measured); False leaves the allocator as
        the worker was started.
    """

    npartitions: int | None = None
    resources: dict[str, Any] | None = None
    max_retries: int = 0
    fail_fast: bool = False
    storage_retries: int = 3
    storage_retry_backoff: float = 0.1
    shuffle: str = "auto"
    shuffle_method: str | None = None
    max_log_chars: int = 32_000
    task_retries: int = 1
    max_group_memory_fraction: float | None = 0.5
    reuse_freed_memory: bool = True

    def __post_init__(self) -> None:
        # A count or an amount computed with numpy (np.int64(4), from a
        # frame's max() or len of an array) is a number to the user: it was
        # refused as "must be a positive int, got np.int64(4)". Kept as the
        # Python number it stands for.
        for name in ("npartitions", "max_retries", "storage_retries", "storage_retry_backoff",
                     "max_log_chars", "task_retries", "max_group_memory_fraction"):
            object.__setattr__(self, name, _plain_number(getattr(self, name)))
        if isinstance(self.resources, dict):
            object.__setattr__(
                self, "resources", {name: _plain_number(amount) for name, amount in self.resources.items()}
            )
        if self.npartitions is not None and (
            not isinstance(self.npartitions, int) or isinstance(self.npartitions, bool) or self.npartitions < 1
        ):
            raise InvalidArgumentError(
                f"npartitions must be a positive int or None, got {self.npartitions!r}"
            )
        if self.resources is not None and not (
            isinstance(self.resources, dict)
            and all(
                isinstance(name, str) and isinstance(amount, (int, float)) and not isinstance(amount, bool)
                and amount > 0
                for name, amount in self.resources.items()
            )
        ):
            raise InvalidArgumentError(
                f"resources must be a dict of names to positive amounts such as {{'GPU': 1}}, "
                f"got {self.resources!r}"
            )
        for name in ("max_retries", "storage_retries", "task_retries"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidArgumentError(f"{name} must be an int >= 0, got {value!r}")
        if self.shuffle not in ("auto", "always", "never"):
            raise InvalidArgumentError(
                f"shuffle must be 'auto', 'always' or 'never', got {self.shuffle!r}"
            )
        if self.shuffle_method not in (None, "p2p", "tasks", "disk"):
            raise InvalidArgumentError(
                f"shuffle_method must be 'p2p', 'tasks', 'disk' or None, got {self.shuffle_method!r}"
            )
        if self.shuffle == "never" and self.npartitions is not None:
            raise InvalidArgumentError(
                f"ExecutionOptions(shuffle='never') runs the input's own partitions, and "
                f"npartitions={self.npartitions} asks for a shuffle into {self.npartitions} tasks; "
                f"give one or the other"
            )
        fraction = self.max_group_memory_fraction
        if fraction is not None and not (
            isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 < fraction <= 1
        ):
            raise InvalidArgumentError(
                f"max_group_memory_fraction must be in (0, 1] or None, got {fraction!r}"
            )
        for name in ("fail_fast", "reuse_freed_memory"):
            object.__setattr__(self, name, check_flag(getattr(self, name), name))
        backoff = self.storage_retry_backoff
        # a negative or NaN delay would only fail later, inside a retry
        if not (isinstance(backoff, (int, float)) and not isinstance(backoff, bool) and 0 <= backoff < float("inf")):
            raise InvalidArgumentError(
                f"storage_retry_backoff must be a number of seconds >= 0, got {backoff!r}"
            )
        if not isinstance(self.max_log_chars, int) or isinstance(self.max_log_chars, bool) or self.max_log_chars < 0:
            raise InvalidArgumentError(
                f"max_log_chars must be an int >= 0, got {self.max_log_chars!r}"
            )


def check_flag(value: Any, name: str, hint: str = "") -> bool:
    """A True-or-False argument of the API, as a bool. numpy's bools (a
    comparison's answer, ``np.True_``) are taken; anything else is refused
    naming the value: a text such as "no" or "False", being truthy, did
    what True does."""
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidArgumentError(f"{name} must be True or False, got {value!r}{hint}")
    return bool(value)


def _plain_number(value: Any) -> Any:
    """A numpy number as the Python int or float it stands for; anything
    else (a bool, a text, None) as it is, for the checks to judge."""
    if isinstance(value, (bool, int, float)) or not isinstance(value, numbers.Real):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)

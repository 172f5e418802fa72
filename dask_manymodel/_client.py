"""Find the Dask client, or start the embedded LocalCluster."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import threading
import weakref
from collections.abc import Iterator

import dask
import distributed

from .exceptions import InvalidArgumentError
from .run import dashboard_link_of, end_live_runs

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_embedded: distributed.Client | None = None
# The client this process found active as it was forked from another
# (multiprocessing or a ProcessPoolExecutor with the 'fork' start method,
# celery's prefork, os.fork()): its event loop's thread did not come along,
# and a run on it waited for ever.
_inherited: "weakref.WeakSet[distributed.Client]" = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _embedded
    # the parent's cluster: closing it at this process's exit waited on the
    # loop that is not here (a minute, then the parent's workers were asked to stop)
    _embedded = None
    with contextlib.suppress(Exception):
        _inherited.add(distributed.Client.current(allow_global=True))


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def get_or_start_client() -> distributed.Client:
    """The active ``distributed.Client``; with none, a client of the
    scheduler Dask's ``scheduler-address`` setting names, else a new
    LocalCluster's.

    ``scheduler-address`` (``DASK_SCHEDULER_ADDRESS``, a dask config file) is
    how a deployment points ``distributed.Client()`` at its cluster, with the
    security settings of the same config (``distributed.comm.tls.*``): a run
    goes there too, as ``Client()`` would. (It started a LocalCluster on the
    client's machine instead, and trained there in silence.)

    The embedded cluster uses worker processes (user functions often hold
    the GIL) and lives until the interpreter exits. Its dashboard link is
    logged at INFO level and shown by every run handle. A script that starts
    it needs the ``if __name__ == "__main__":`` guard, as for
    ``multiprocessing``: the worker processes import the script.
    """
    global _embedded
    try:
        client = distributed.get_client()
    except ValueError:
        pass
    else:
        return _synchronous(client)
    with _lock:
        if _embedded is None or _embedded.status in ("closed", "closing"):
            if _embedded is not None and _embedded.cluster is not None:
                # its client was closed by the user: its workers would run on
                # beside the new cluster's until the interpreter exits
                _embedded.cluster.close()
            address = dask.config.get("scheduler-address", None)
            if address:
                _embedded = _connect_to_the_configured_scheduler(address)
                return _embedded
            with _interrupts_ignored_by_new_processes():
                cluster = distributed.LocalCluster(processes=True, dashboard_address=":0")
            _embedded = distributed.Client(cluster, set_as_default=True)
            _embedded.register_plugin(IgnoreInterrupts())  # also workers the nanny starts again later
            atexit.register(_close_embedded)
            logger.info(
                "no Dask client was active; started a LocalCluster with %d workers, "
                "dashboard at %s",
                len(cluster.workers),
                dashboard_link_of(_embedded),
            )
        return _embedded


def _connect_to_the_configured_scheduler(address: str) -> distributed.Client:
    """``distributed.Client()``: the scheduler at ``address`` (Dask's
    ``scheduler-address`` setting), with the config's security. Not this
    process's cluster: no plugin is registered on its workers, and only the
    client is closed at exit."""
    try:
        client = distributed.Client(set_as_default=True)
    except (OSError, ValueError, TypeError) as exc:  # unreachable, a refused TLS handshake, a bad address
        raise InvalidArgumentError(
            f"no Dask client was active, and Dask's scheduler-address setting (DASK_SCHEDULER_ADDRESS or a "
            f"dask config file) names {address!r}, which could not be connected to: {type(exc).__name__}: "
            f"{exc}. Start that scheduler or correct the setting (its security settings too, "
            f"distributed.comm.tls.*), unset it to have a LocalCluster started here, or create a "
            f"distributed.Client first"
        ) from exc
    atexit.register(_close_embedded)
    logger.info(
        "no Dask client was active; connected to the scheduler %s of Dask's scheduler-address setting, "
        "dashboard at %s",
        client.scheduler.address,
        dashboard_link_of(client),
    )
    return client


class IgnoreInterrupts(distributed.WorkerPlugin):
    """Keep SIGINT from the embedded cluster's worker processes.

    Jupyter's stop button (and its restart, which interrupts first) sends
    SIGINT to the kernel's whole process group, the worker processes of a
    LocalCluster started there included: they die, nobody starts them again,
    and every later run in the kernel waits for ever on a cluster of no
    workers (dask/distributed#1925). The kernel still gets its
    KeyboardInterrupt; the workers stop when the cluster is closed, as they
    always do (SIGTERM). dask_manymodel registers it on the cluster it
    starts itself only: a worker someone started in a terminal must stop on
    Ctrl-C. Register it on a LocalCluster of your own in a notebook:

    >>> client = distributed.Client(distributed.LocalCluster())  # doctest: +SKIP
    >>> client.register_plugin(dask_manymodel.IgnoreInterrupts())  # doctest: +SKIP

    Not for a cluster whose workers run in the notebook's own process
    (``LocalCluster(processes=False)``): there, it is the kernel that would
    ignore the stop button.
    """

    name = "dask-manymodel-ignore-interrupts"

    def setup(self, worker: distributed.Worker) -> None:
        if threading.current_thread() is threading.main_thread():  # a worker process's loop: it is
            with contextlib.suppress(ValueError, OSError):  # a subinterpreter: no signals to set
                signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def _interrupts_ignored_by_new_processes() -> Iterator[None]:
    """While starting the embedded cluster: its worker processes start with
    SIGINT ignored (a process keeps an ignored signal ignored), before the
    plugin reaches them. A Ctrl-C in these seconds is lost."""
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if previous is None:  # not the main thread, or a handler set from C that Python cannot put back
        yield
        return
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except (ValueError, OSError):  # a subinterpreter: no signals to set
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def outside_the_worker_pool() -> Iterator[None]:
    """Inside a Dask task (a run started from another run's function, or
    from any task), leave the worker's thread pool while this blocks on the
    run's own tasks, as ``distributed.worker_client()`` does: otherwise the
    tasks waited for may find every worker thread held by tasks that wait
    on them, for ever. Elsewhere (and within ``worker_client()``) it does
    nothing."""
    try:
        distributed.get_worker()
    except ValueError:  # not on a worker
        yield
        return
    with distributed.worker_client():  # secedes only in a task's own thread, and not twice
        yield


def _synchronous(client: distributed.Client) -> distributed.Client:
    """``client``, if this call is not running in its event loop: a run's
    start waits on results (``future.result()``), which an asynchronous
    client would hand back as coroutines. Nor one this process inherited
    through a fork, which would never answer; nor one that lost its
    scheduler and tries to reconnect."""
    if client in _inherited:
        address = getattr(client.scheduler, "address", None)
        # a TLS cluster refuses a client without its certificates: the
        # advice alone led to Dask's "TLS expects a `ssl_context` argument"
        security = ", security=..." if str(address).startswith(("tls://", "wss://")) else ""
        with_it = " with the same Security (TLS certificates) as the parent's client" if security else ""
        raise InvalidArgumentError(
            f"the active Dask client was made in the process this one was forked from (multiprocessing "
            f"or a ProcessPoolExecutor with the 'fork' start method, celery's prefork, os.fork()): a "
            f"client does not survive a fork, and the run would wait for ever. Make a client in this "
            f"process, distributed.Client({address!r}{security}){with_it}, or start the "
            f"processes with the 'spawn' or 'forkserver' method"
        )
    if client.asynchronous:
        raise InvalidArgumentError(
            "dask_manymodel needs a synchronous Dask client, but the active one is asynchronous "
            "(Client(asynchronous=True), called from its event loop); start the run from a thread "
            "(await asyncio.to_thread(ddf.manymodel.train, ...)), where the same client serves it, and "
            "wait on the run from a thread too (await asyncio.to_thread(run.wait)); or create the Client "
            "without asynchronous=True"
        )
    if client.status == "connecting":
        # it lost its scheduler (killed, closed, the network gone) and tries
        # to reconnect: a run's start waited out that try (Client(timeout=),
        # 30 s by default), then failed with Dask's "ConnectionPool closing"
        # or "Timed out trying to connect"
        raise InvalidArgumentError(
            f"the active Dask client lost its scheduler ({getattr(client.scheduler, 'address', None)!r}) and is "
            f"trying to reconnect; nothing was started. Start again once it has (client.status == 'running'), "
            f"or make a distributed.Client of another cluster"
        )
    return client


def _close_embedded() -> None:
    global _embedded
    if _embedded is not None:
        end_live_runs()  # while the embedded cluster can still cancel them (done already, unless atexit's order)
        cluster = _embedded.cluster
        _embedded.close()
        if cluster is not None:
            cluster.close()
        _embedded = None

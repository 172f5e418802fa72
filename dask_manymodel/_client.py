"""Find the Dask client, or start the embedded LocalCluster."""

from __future__ import annotations

import atexit
import logging
import threading

import distributed

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_embedded: distributed.Client | None = None


def get_or_start_client() -> distributed.Client:
    """The active ``distributed.Client``; with none, start a LocalCluster.

    The embedded cluster uses worker processes (user functions often hold
    the GIL) and lives until the interpreter exits. Its dashboard link is
    logged at INFO level and shown by every run handle.
    """
    global _embedded
    try:
        return distributed.get_client()
    except ValueError:
        pass
    with _lock:
        if _embedded is None or _embedded.status in ("closed", "closing"):
            cluster = distributed.LocalCluster(processes=True, dashboard_address=":0")
            _embedded = distributed.Client(cluster, set_as_default=True)
            atexit.register(_close_embedded)
            logger.info(
                "no Dask client was active; started a LocalCluster with %d workers, "
                "dashboard at %s",
                len(cluster.workers),
                _embedded.dashboard_link,
            )
        return _embedded


def _close_embedded() -> None:
    global _embedded
    if _embedded is not None:
        cluster = _embedded.cluster
        _embedded.close()
        if cluster is not None:
            cluster.close()
        _embedded = None

"""Joining or starting a Ray cluster: shared by the indexer's Ray engine and sharded serving."""

from __future__ import annotations

import os

import ray

__all__ = ["FORWARDED_ENV_PREFIXES", "RayClusterError", "connect", "forwarded_env"]

FORWARDED_ENV_PREFIXES = ("PROPONENT_", "AWS_")  # the workers' settings and object-store credentials


class RayClusterError(RuntimeError):
    """The Ray cluster could not be started or joined; the message is one line."""


def forwarded_env() -> dict[str, str]:
    """The environment Ray workers need from the driver's: proponent settings, object-store credentials."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}


def connect(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at ``address`` or start a local one; True when this call started Ray."""
    if ray.is_initialized():
        return False
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(
                num_cpus=num_cpus,
                include_dashboard=False,
                object_store_memory=int(os.environ.get("PROPONENT_RAY_OBJECT_STORE", 256 << 20)),
                log_to_driver=False,
            )
    except Exception as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
        raise RayClusterError(f"cannot start or join {where}: {type(e).__name__}: {e}") from None
    return True

"""A worker that lost its Redis broker must reconnect, not stall (celery/celery#10205, kombu 5.7).

When the broker connection drops, Celery closes the channel and kombu's Redis QoS tries to restore
unacknowledged messages through a connection that is already gone: ``Channel._connparams`` then fails
with ``AttributeError: 'NoneType' object has no attribute 'hostname'``. That is not one of the
transport's connection errors, so ``kombu.common.ignore_errors`` lets it escape and the consumer never
reconnects: the worker stays up and consumes nothing (seen in tests/test_worker_resilience.py).

Raising the transport's own connection error there instead lets Celery carry on with its usual
reconnect. The unacknowledged messages are not lost: Redis redelivers them after the visibility
timeout, and the outbox republishes any task left ``queued`` too long (``PACS_TASK_REQUEUE_S``).
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis
from redis.exceptions import ConnectionError as RedisConnectionError

#: Any: the kombu stubs (celery-types) leave out the private method patched here.
_Channel: Any = kombu_redis.Channel
_original_connparams = _Channel._connparams


def _connparams(self: Any, asynchronous: bool = False) -> Any:
    if self.connection.client is None:
        raise RedisConnectionError("broker connection already closed")
    return _original_connparams(self, asynchronous=asynchronous)


def install() -> None:
    """Idempotent; called where the Celery app is made."""
    if _Channel._connparams is not _connparams:
        _Channel._connparams = _connparams

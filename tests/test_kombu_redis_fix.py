"""The Redis transport fix (workers.kombu_redis_fix): closing a channel whose broker connection is gone
raises the transport's own connection error, which kombu's ignore_errors swallows so that Celery's
consumer reconnects, instead of an AttributeError that left the worker consuming nothing."""

from __future__ import annotations

import pytest
from kombu import Connection
from kombu.common import ignore_errors
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.support.stack import REDIS_URL
from workers import kombu_redis_fix
from workers.celery_app import make_celery


@pytest.mark.integration
def test_a_closed_connection_gives_a_connection_error_that_kombu_ignores() -> None:
    make_celery(REDIS_URL)  # installs the fix for redis:// brokers
    connection = Connection(REDIS_URL)
    try:
        channel = connection.default_channel
        transport = channel.connection
        client = transport.client
        transport.client = None  # what kombu leaves behind once the broker connection is lost
        try:
            with pytest.raises(RedisConnectionError):
                channel._connparams()
            with ignore_errors(connection):  # what Celery's consumer wraps its close in: swallowed, it goes on
                channel._connparams()
        finally:
            transport.client = client
        assert channel._connparams()["port"]  # a live connection is untouched
    finally:
        connection.release()


def test_install_is_idempotent() -> None:
    kombu_redis_fix.install()
    kombu_redis_fix.install()
    from kombu.transport import redis as kombu_redis

    assert kombu_redis.Channel._connparams is kombu_redis_fix._connparams

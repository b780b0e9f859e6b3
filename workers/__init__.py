"""Celery glue for `pacs worker`: the app and its derived-task task, the Celery publisher, the delivery loops.

The derived work itself (kinds, handlers, outbox relay, leases) is in :mod:`pacs.derived`; nothing here
touches the index or the object store.
"""

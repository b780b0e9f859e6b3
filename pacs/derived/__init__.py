"""Derived work: what the archive makes from what it stores, after ingest has answered.

Ingest arms one outbox row (``derived_task``) per piece of work in its own transaction; the work runs
later, in this process's pool (embedded mode) or in Celery workers (scaled mode, :mod:`workers`), and
a broker outage or a killed process delays it, never loses it.

- :mod:`.kinds` — the kinds of work, as stored in the rows;
- :mod:`.instance`, :mod:`.series` — the handlers: an instance's thumbnail and DICOM JSON fragment; a series'
  metadata document, representative thumbnails and order link (a report's SR is :mod:`pacs.reports.publish`);
- :mod:`.runner` — runs one row: claim, handler, outcome (:mod:`.outcomes`: transient, deferred, completed);
- :mod:`.relay` — the outbox relay that publishes rows, and its sweep; :mod:`.pool` — the in-process pool;
- :mod:`.lease` — which process holds a row, heartbeats, and taking back the rows of dead processes;
- :mod:`.admin` — counts, failed rows and retry, for ``pacs tasks``.

This module imports nothing, so that :mod:`pacs.ingest` and the read side may import :mod:`.kinds` cheaply.
"""

"""The one door in: received objects are parsed, stored and indexed here, whatever the transport.

- :mod:`~pacs.ingest.service`: :class:`Ingestor`, the one ingest function (order of writes in its docstring)
- :mod:`~pacs.ingest.parsing`: received bytes to a validated :class:`~pacs.ingest.parsing.ReceivedObject` (pure)
- :mod:`~pacs.ingest.ownership`, :mod:`~pacs.ingest.claim`: who may write a study; a trusted exam claiming one
- :mod:`~pacs.ingest.index_writer`: the patient/study/series/instance rows of one object
- the derived-work rows armed in the same transaction: :mod:`pacs.derived.outbox`
- :mod:`~pacs.ingest.statuses`: outcome to C-STORE status / STOW-RS Failure Reason (one table)
- :mod:`~pacs.ingest.importer`: ``pacs import`` of a folder or zip
"""

from pacs.ingest.outcome import IngestOutcome, IngestStatus
from pacs.ingest.service import Ingestor, TaskNotifier
from pacs.ingest.source import IngestSource

__all__ = [
    "IngestOutcome",
    "IngestSource",
    "IngestStatus",
    "Ingestor",
    "TaskNotifier",
]

"""The audit trail of every access to patient data and every configuration change (SPEC §7).

- :mod:`pacs.audit.trail`: the append-only, hash-chained rows: append, record, verify, and the coalescing of
  high-volume reads (re-exported here: ``from pacs import audit``; ``audit.append(...)``);
- :mod:`pacs.audit.search`: one filter type for ``GET /api/audit``, its export and ``pacs audit list``, and
  which rows an administrator of one facility sees;
- :mod:`pacs.audit.fhir_export`: rows as FHIR R4 ``AuditEvent`` resources (pure functions);
- :mod:`pacs.audit.dimse`: what the one row of a DIMSE request or a refused association says.
"""

from pacs.audit.trail import AuditProblem, ReadCoalescer, append, entry_hash, record, verify

__all__ = ["AuditProblem", "ReadCoalescer", "append", "entry_hash", "record", "verify"]

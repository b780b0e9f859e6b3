"""Teleconsultation (issue 14): a doctor asks another facility (or an outside doctor through a share link of
scope ``study``) about one study; the consulted side sees that study while the consult is open and answers.

- :mod:`pacs.consults.models`: the ``consult`` and ``consult_answer`` tables;
- :mod:`pacs.consults.grants`: the SQL term :func:`pacs.security.access.study_condition` adds, so that every read
  path (QIDO, WADO, metadata, FHIR, reports, the reading list) shows the consulted facility exactly that study
  for exactly the consult's lifetime;
- :mod:`pacs.consults.service`: request, list, open, answer, close, expire, each audited.
"""

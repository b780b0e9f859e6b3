"""FHIR R4 views of the archive for EMRs (SPEC §6): ImagingStudy and Patient, read and search.

- :mod:`.ids` makes stable FHIR ids: a study's is its Study Instance UID; a patient's encodes the
  Patient ID and its issuer, so no lookup table is needed and a rebuilt index gives the same ids;
- :mod:`.search` turns FHIR search parameters into query-engine filters (token and date matching);
- :mod:`.resources` builds the JSON resources (ImagingStudy, Patient, Bundle, OperationOutcome,
  CapabilityStatement) from index rows;
- :mod:`.service` runs searches and reads through :class:`pacs.query.engine.QueryEngine` inside the
  asker's access scope.
"""

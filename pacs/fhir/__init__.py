"""FHIR R4 views of the archive and its RIS for EMRs (SPEC §6): ImagingStudy, Patient, DiagnosticReport
and ServiceRequest.

- :mod:`.ids` makes stable FHIR ids: a study's is its Study Instance UID; a patient's encodes the
  Patient ID and its issuer, so no lookup table is needed and a rebuilt index gives the same ids;
- :mod:`.search` turns FHIR search parameters into filters (token and date matching), strictly: an
  unknown parameter is an error unless the client prefers lenient handling;
- :mod:`.resources` builds the JSON resources (ImagingStudy, Patient, Bundle, OperationOutcome,
  CapabilityStatement) from index rows, and the per-study viewer link extension;
- :mod:`.diagnostic_report` publishes report versions (id ``r{report id}``; drafts never);
- :mod:`.service_request` shows orders (id = the accession number) and turns a posted ServiceRequest
  into an order;
- :mod:`.service` runs reads, searches and creates inside the asker's access scope.
"""

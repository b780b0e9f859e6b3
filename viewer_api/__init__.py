"""The HTTP layer (FastAPI): health now; DICOMweb, reports, FHIR and share links build on it."""

"""Radiology reports: lifecycle, reading list, and what a signed report becomes (SR, FHIR, HL7, PDF)."""

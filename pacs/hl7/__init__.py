"""HL7 v2 over MLLP: orders in (ORM^O01), results out (ORU^R01)."""

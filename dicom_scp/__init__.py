"""The DIMSE server: association policy and one thin handler per service, each calling `pacs`."""

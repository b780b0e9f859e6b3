"""Managing studies (IHE IOCM and beyond): correct and move, reject and restore, delete and retention, and moving
studies in and out (zip upload, zip download with a DICOMDIR, sending to a DICOM peer).

Each operation is one module here; HTTP (``viewer_api``) and the CLI (``pacs study``) only call them.
"""

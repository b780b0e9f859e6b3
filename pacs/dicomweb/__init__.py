"""The read side of DICOMweb (PS3.18) as transport-free logic: QIDO-RS searches, WADO-RS and WADO-URI.

``viewer_api.dicomweb`` only adapts HTTP to these modules:

- :mod:`.qido` turns search parameters into a :class:`pacs.query.engine.Query` (the C-FIND engine);
- :mod:`.qido_json` renders query rows as DICOM JSON (PS3.18 F.2), QIDO-RS's answer;
- :mod:`.media` parses ``Accept`` and picks what each resource returns (406 when nothing fits);
- :mod:`.resources` resolves UIDs inside an access scope and lists the stored instances they name;
- :mod:`.multipart` writes ``multipart/related`` bodies as a stream;
- :mod:`.objects` reads stored objects: as stored, converted, one frame, one bulk data value;
- :mod:`.metadata` builds a stored instance's DICOM JSON, bulk data as URIs (WADO-RS ``/metadata``);
- :mod:`.documents` serves ``/metadata`` from the workers' documents, or builds it when they are behind;
- :mod:`.rendering` renders frames and thumbnails (through :mod:`pacs.imaging.render`);
- :mod:`.wado` assembles the WADO-RS / WADO-URI responses from the above;
- :mod:`.wado_uri` checks WADO-URI's query parameters.

STOW-RS (``stow.py`` and the modules it uses) belongs to the write side.
"""

"""Pixel-data rendering for the archive: DICOM frames to 8-bit display images.

Pure functions only (no storage, no database), shared by the thumbnail worker,
WADO-RS ``/rendered`` and the viewer. See :mod:`pacs.imaging.render`.
"""

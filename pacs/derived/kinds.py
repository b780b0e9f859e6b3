"""The kinds of derived work, as stored in ``derived_task.kind``.

The strings are in the rows of existing outboxes, so they never change; the Python names say what the
work is. ``report-sr`` (the DICOM SR of a signed report version) is armed by the report lifecycle and
named there (:data:`pacs.reports.lifecycle.REPORT_SR_KIND`).
"""

from __future__ import annotations

#: Per instance version: its thumbnail *and* its DICOM JSON fragment, from one read of the stored object.
#: The string predates the fragment (rows already armed with it must still run), hence "thumbnail".
INSTANCE_DERIVED_KIND = "thumbnail"

#: Per series (one row, re-armed by every instance): the series' DICOM JSON document, its representative
#: series and study thumbnails, and the link from the study to the order it fulfils.
SERIES_METADATA_KIND = "series-metadata"

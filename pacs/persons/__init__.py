"""One person, one record: patient records of several facilities that share a national identifier.

- :mod:`.models`: the ``person`` and ``person_identifier`` tables (``patient.person_fk`` links a record);
- :mod:`.identifiers`: which national identifiers a received dataset carries (settings ``national_id_*``);
- :mod:`.linking`: linking at ingest, and the audited manual link / unlink / merge (`pacs patient ...`);
- :mod:`.scope`: who sees a person's studies of other facilities (setting ``priors_across_facilities``).

Records are linked only on national identifiers, never on names or birth dates.
"""

"""Storage Commitment (PS3.4 Annex J): ``service`` decides what is durably stored and runs the report queue;
``models`` is its table (``storage_commitment``), registered on the index's metadata by :mod:`pacs.db.models`.

Nothing is imported here: :mod:`pacs.db.models` imports ``models``, which runs this file first, and the
service needs the index, the store and the network.
"""

"""The reconciliation queue: objects received and kept, but not filed into the study they name.

``service`` holds, lists and resolves them; ``models`` is its table (``reconciliation_item``) and the names of
its states and reasons, registered on the index's metadata by :mod:`pacs.db.models`. Nothing is imported here
(:mod:`pacs.db.models` imports ``models``, which runs this file first).
"""

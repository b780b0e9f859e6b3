"""The archive's one UID rule (PS3.5 §9.1), for the transports: defined with the key layout in
:mod:`storage.keys`, which transports do not import (``tests/test_import_rules.py``)."""

from storage.keys import UID_MAX_LEN, is_valid_uid

__all__ = ["UID_MAX_LEN", "is_valid_uid"]

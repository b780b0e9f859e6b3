"""Folding text for search: "Nguyễn Văn An" and "NGUYEN VAN AN" fold to the same key."""

from __future__ import annotations

import unicodedata

# Letters that Unicode does not decompose into base + combining mark.
_EXTRA_FOLDS = str.maketrans({"đ": "d", "Đ": "D", "ø": "o", "Ø": "O", "ł": "l", "Ł": "L", "ß": "ss"})


def fold(text: str) -> str:
    """Upper-case, diacritic-free form of ``text`` used by the index's ``*_search`` columns."""
    decomposed = unicodedata.normalize("NFD", text.translate(_EXTRA_FOLDS))
    stripped = "".join(ch for ch in decomposed if unicodedata.category(ch) != "Mn")
    return unicodedata.normalize("NFC", stripped).upper()

"""The one query layer for C-FIND, the worklist and (later) QIDO-RS."""

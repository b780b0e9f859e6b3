"""The long-running server commands' start-up heap, kept out of the cyclic garbage collector's way.

Once `pacs serve`, `pacs scp` or a DICOM receiving process has started, its heap holds ~300,000 objects that live
as long as the process: modules, classes, functions, SQLAlchemy's tables and compiled statements, pydicom's
dictionaries, pynetdicom's SOP classes. Every full collection of the cyclic garbage collector walks all of them:
150-250 ms of CPU holding the GIL on the 2-core reference machine, a stall for every association and request in
flight, and the interpreter starts one by itself whenever the objects that survived since the last one reach a
quarter of that heap. :func:`freeze_startup_heap` collects once, then moves what is left to the permanent
generation (:func:`gc.freeze`): later collections walk only the objects made since, which is where the garbage
of associations and requests is (reference cycles, such as pynetdicom's association and its DUL).

An object frozen here is never freed by the cyclic collector; reference counting still frees it. Only an
object that is alive at start-up and later becomes part of an unreachable reference cycle is kept for good:
start-up state lives as long as the process anyway.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Collect the start-up garbage, then exempt what survives from later collections (see the module docstring)."""
    gc.collect()
    gc.freeze()

"""Derived work (thumbnails now; metadata, forwarding later): Celery tasks and the in-process runner."""

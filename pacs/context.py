"""What one process needs, built once at its entry point from Settings and passed down."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from pacs.db.engine import make_engine, make_read_session_factory, make_session_factory
from pacs.imaging import limits
from pacs.settings import Settings
from storage import ObjectStore, open_store


@dataclass
class AppContext:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    read_sessions: sessionmaker[Session]  # for queries that write nothing
    store: ObjectStore
    extras: dict[str, object] = field(default_factory=dict)

    @classmethod
    def create(cls, settings: Settings) -> AppContext:
        if not settings.database_url or not settings.storage_url:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        limits.configure(settings.max_decoded_mib, settings.decode_budget_mib)
        engine = make_engine(settings.effective_database_url)
        return cls(settings=settings, engine=engine, sessions=make_session_factory(engine),
                   read_sessions=make_read_session_factory(engine), store=open_store(settings.effective_storage_url))

    def close(self) -> None:
        self.engine.dispose()

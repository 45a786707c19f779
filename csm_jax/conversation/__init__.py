"""Conversations: persistent turn history (store) and context-window prompts for CSM (manager)."""

from typing import Any

from csm_jax.conversation.manager import ContextFull, ConversationManager, Prompt
from csm_jax.conversation.store import SQLiteStore, Store, StoreError, Turn, UnknownConversation, open_store

__all__ = [
    "ContextFull",
    "ConversationManager",
    "PostgresStore",
    "Prompt",
    "SQLiteStore",
    "Store",
    "StoreError",
    "Turn",
    "UnknownConversation",
    "open_store",
]


def __getattr__(name: str) -> Any:
    if name == "PostgresStore":  # imported on first use: only PostgreSQL users load psycopg and libpq
        from csm_jax.conversation.postgres import PostgresStore

        return PostgresStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

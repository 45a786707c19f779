"""Conversations: persistent turn history (store) and context-window prompts for CSM (manager)."""

from csm_jax.conversation.manager import ContextFull, ConversationManager, Prompt
from csm_jax.conversation.store import SQLiteStore, Store, StoreError, Turn, UnknownConversation, open_store

__all__ = [
    "ContextFull",
    "ConversationManager",
    "Prompt",
    "SQLiteStore",
    "Store",
    "StoreError",
    "Turn",
    "UnknownConversation",
    "open_store",
]

"""Persistent embedding cache: the folder (keys) holds cache.sqlite3 (store: every table, shared by
any number of processes) and faiss/<gallery>.faiss (gallery_search: a big gallery's IVF index)."""
from .embedding_cache import NO_FAISS_ENV, EmbeddingCache, SearchHit
from .keys import CACHE_DIR_ENV, gallery_key, prompt_key, resolve_cache_dir
from .store import Busy

__all__ = ["Busy", "EmbeddingCache", "SearchHit", "resolve_cache_dir", "gallery_key", "prompt_key", "CACHE_DIR_ENV",
           "NO_FAISS_ENV"]

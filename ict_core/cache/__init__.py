"""Persistent embedding cache: prompt features and image galleries per model, searched with faiss.

Layout under the cache folder (keys.resolve_cache_dir): cache.sqlite3 (store: every table, WAL
mode, shared by any number of processes) and faiss/<gallery>.faiss (gallery_search: the IVF index
of a big gallery). Importable without torch; faiss is imported on the first search.
"""
from .embedding_cache import NO_FAISS_ENV, EmbeddingCache, SearchHit
from .keys import CACHE_DIR_ENV, gallery_key, hash_bytes, hash_file, hash_pixels, prompt_key, resolve_cache_dir

__all__ = ["EmbeddingCache", "SearchHit", "resolve_cache_dir", "gallery_key", "prompt_key", "hash_bytes",
           "hash_file", "hash_pixels", "CACHE_DIR_ENV", "NO_FAISS_ENV"]

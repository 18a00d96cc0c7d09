"""Shared by every test file: tiktoken reads its r50k_base vocabulary from ../shared/tiktoken_cache when that folder
is there (CI and offline machines); elsewhere it downloads it once, as for any user."""

import os

_cache = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "shared", "tiktoken_cache")
if os.path.isdir(_cache):
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", _cache)  # subprocesses of the tests inherit it

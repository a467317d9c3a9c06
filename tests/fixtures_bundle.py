"""Kept so `from tests.fixtures_bundle import ...` goes on working: the bundle fixtures and helpers live in
tests/plugins/bundles.py (registered in tests/conftest.py, which is where the fixtures come from)."""

from tests.plugins.bundles import (
    INPUT_SIZE,
    LFW,
    TINY_PEOPLE,
    TINY_PHOTOS,
    TRAIN_ARGS,
    WEIGHTS,
    embedding_base,
    make_loadable_bundle,
    tiny_selection,
)

__all__ = ["INPUT_SIZE", "LFW", "TINY_PEOPLE", "TINY_PHOTOS", "TRAIN_ARGS", "WEIGHTS", "embedding_base",
           "make_loadable_bundle", "tiny_selection"]

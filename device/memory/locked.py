"""`locked`: a method of a memory that holds the memory's `self.lock` while it runs.

The memories are written by the frame loop and read, changed and forgotten by the command runner's thread
(and the stranger memory by the shared strangers' thread): each public method is one step under its lock.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def locked(method: F) -> F:
    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return method(self, *args, **kwargs)
    return wrapper  # type: ignore[return-value]

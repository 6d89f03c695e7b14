"""An fsspec memory filesystem that injects storage faults on demand.

* ``storm(method, n)``: the next ``n`` calls of ``method`` fail like an S3 503 SlowDown.
* ``short_reads = True``: every ``read(n)`` returns at most a few bytes.
* ``replace_on_open[path] = data``: the object is replaced right after a reader opened it.
* ``stale``: a listing snapshot that ``find`` keeps returning (gone objects, missing new ones).
"""

from __future__ import annotations

import io
from collections import Counter
from typing import Any

from fsspec.implementations.memory import MemoryFileSystem


class SlowDown(OSError):
    """What a 503 storm looks like to the caller."""


class ShortReader(io.BytesIO):
    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            return super().read()
        return super().read(min(size, 7))


class FaultyFileSystem(MemoryFileSystem):
    protocol = ("faulty",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failures: Counter[str] = Counter()
        self.injected: Counter[str] = Counter()
        self.short_reads = False
        self.replace_on_open: dict[str, bytes] = {}
        self.stale: dict[str, Any] | None = None

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        return str(super()._strip_protocol(path.removeprefix("faulty://")))

    def storm(self, method: str, n: int) -> None:
        self.failures[method] += n

    def _maybe_fail(self, method: str) -> None:
        if self.failures[method] > 0:
            self.failures[method] -= 1
            self.injected[method] += 1
            raise SlowDown(f"503 SlowDown (injected into {method})")

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        self._maybe_fail("open")
        handle = super()._open(path, mode, **kwargs)
        if "r" in mode:
            stripped = self._strip_protocol(path)
            if stripped in self.replace_on_open:
                self.injected["replaced"] += 1
                self.pipe_file(stripped, self.replace_on_open.pop(stripped))
            if self.short_reads:
                self.injected["short_read"] += 1
                return ShortReader(handle.read())
        return handle

    def cat_file(
        self, path: str, start: int | None = None, end: int | None = None, **kw: Any
    ) -> bytes:
        self._maybe_fail("cat_file")
        return bytes(super().cat_file(path, start, end, **kw))

    def find(self, path: str, *args: Any, **kwargs: Any) -> Any:
        self._maybe_fail("find")
        if self.stale is not None and kwargs.get("detail"):
            self.injected["stale_listing"] += 1
            prefix = self._strip_protocol(path).rstrip("/") + "/"
            return {k: v for k, v in self.stale.items() if k.startswith(prefix)}
        return super().find(path, *args, **kwargs)

    def rm_file(self, path: str) -> None:
        self._maybe_fail("rm_file")
        super().rm_file(path)

"""A delta a node still holds: its layout is known now, its bytes only if they are wanted.

A remote node's cycle returns its result header first; the coordinator weighs every node on
what the headers say and fetches only the deltas it accepts, so a rejected delta never
crosses the wire. :class:`DeferredState` is that delta inside the core: a read-only
``Mapping`` whose keys, dtypes and shapes answer without the bytes, and whose first tensor
read fetches the whole state (once; later reads and a failed fetch answer the same).
:meth:`release` tells the node its delta is not wanted.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping

import torch

Spec = tuple[torch.dtype, tuple[int, ...]]
"""A tensor's dtype and shape."""


class DeferredState(Mapping[str, torch.Tensor]):
    """A state known by its layout (``specs``: key -> dtype and shape) until
    :meth:`fetch` gets it, by ``fetch`` (called at most once). ``release`` (called at most
    once, and never after a fetch began) gives the state up. Thread-safe."""

    def __init__(
        self,
        specs: Mapping[str, Spec],
        fetch: Callable[[], Mapping[str, torch.Tensor]],
        release: Callable[[], None],
    ) -> None:
        self.specs = dict(specs)
        self._fetch = fetch
        self._release = release
        self._lock = threading.Lock()
        self._state: Mapping[str, torch.Tensor] | None = None
        self._error: BaseException | None = None
        self._settled = False  # fetched, failed or released: the node's call is done with

    @property
    def fetched(self) -> bool:
        """Whether the state is here (a fetch succeeded)."""
        return self._state is not None

    @property
    def stats(self) -> object:
        """The fetched state's measured stats (``None`` before it is here)."""
        return getattr(self._state, "stats", None)

    @property
    def sha256(self) -> str:
        """The digest the fetched state arrived with (``""`` before, or if unknown)."""
        digest = getattr(self._state, "sha256", "")
        return digest if isinstance(digest, str) else ""

    def fetch(self) -> Mapping[str, torch.Tensor]:
        """The state, fetched on the first call; a fetch that failed raises the same error
        again, and a released state is a ``RuntimeError``."""
        with self._lock:
            if not self._settled:
                self._settled = True
                try:
                    self._state = self._fetch()
                except BaseException as error:
                    self._error = error
            if self._state is not None:
                return self._state
            if self._error is not None:
                raise self._error
            raise RuntimeError("this delta was released: it was not wanted and never fetched")

    def release(self) -> None:
        """Give the state up unless it was fetched (or a fetch was tried): a no-op then."""
        with self._lock:
            if self._settled:
                return
            self._settled = True
        self._release()

    def blocks(self, name: str, elements: int) -> Iterator[tuple[int, torch.Tensor]]:
        """The fetched state's blocks of ``name``
        (:func:`~tapestry.training.consortium.tensors.tensor_blocks`): a spilled delta is
        still read a block at a time through its deferred wrapper."""
        from tapestry.training.consortium.tensors import tensor_blocks  # imports this module

        return tensor_blocks(self.fetch(), name, elements)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.specs:
            raise KeyError(name)
        return self.fetch()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

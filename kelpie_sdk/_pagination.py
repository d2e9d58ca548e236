"""
Lazy iteration over page-numbered list endpoints.

Kelpie's ``GET /jobs`` pages by number (``page`` from 1, ``page_size``), and its
``_count`` is the length of the page, not a total. So the paginator asks for
page 1, 2, ... and stops at the first page shorter than ``page_size``.

Offset pages can skip or repeat items while others are created or deleted
between requests; walking oldest first (``asc=True``) keeps new items at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

import attrs

__all__ = ["Page", "Paginator"]

T = TypeVar("T")


@attrs.frozen
class Page(Generic[T]):
    """
    One page of results.

    Attributes:
        number: The page number, from 1.
        items: The items on this page.
    """

    number: int
    items: tuple[T, ...]

    def __iter__(self) -> Iterator[T]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


class Paginator(Generic[T]):
    """
    Iterates over every item of a paged listing, fetching pages only as needed.

    Iterating again starts again from page 1 (and asks the server again).

    Args:
        fetch: Returns the items of page ``number`` of size ``page_size``.
        page_size: Items per page, at least 1.
        keep: Items for which it is false are left out (pages still end by
            the length of what was fetched).
    """

    def __init__(
        self,
        fetch: Callable[[int, int], Sequence[T]],
        *,
        page_size: int,
        keep: Callable[[T], bool] | None = None,
    ) -> None:
        if isinstance(page_size, bool) or not isinstance(page_size, int):
            raise TypeError(f"page_size must be an integer, got {page_size!r}")
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {page_size}")
        self._fetch = fetch
        self._keep = keep
        self.page_size = page_size

    def pages(self) -> Iterator[Page[T]]:
        """
        Yield the non-empty pages in order, fetching each when it is reached.
        """
        number = 1
        while True:
            fetched = tuple(self._fetch(number, self.page_size))
            keep = self._keep
            items = fetched if keep is None else tuple(i for i in fetched if keep(i))
            if items:
                yield Page(number, items)
            if len(fetched) < self.page_size:
                return
            number += 1

    def __iter__(self) -> Iterator[T]:
        for page in self.pages():
            yield from page.items

    def __repr__(self) -> str:
        return f"<Paginator page_size={self.page_size}>"

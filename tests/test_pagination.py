"""
Tests for the lazy paginator, against a local page function.

The same property against the real server is in tests/test_client_endpoints.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kelpie_sdk._pagination import Page, Paginator


class FakePages:
    """Serves a list in numbered pages and records each request."""

    def __init__(self, items: Sequence[int]) -> None:
        self.items = list(items)
        self.calls: list[tuple[int, int]] = []

    def __call__(self, page: int, size: int) -> list[int]:
        self.calls.append((page, size))
        start = (page - 1) * size
        return self.items[start : start + size]


@given(items=st.lists(st.integers(), max_size=300), page_size=st.integers(1, 50))
def test_yields_every_item_once_in_order(items: list[int], page_size: int) -> None:
    """Iterating yields each item exactly once, in order, for any size."""
    assert items == list(Paginator(FakePages(items), page_size=page_size))


@given(count=st.integers(min_value=0, max_value=300), page_size=st.integers(1, 50))
def test_fetches_only_the_pages_needed(count: int, page_size: int) -> None:
    """Full pages are followed by one more request; a short page ends the walk."""
    fake = FakePages(range(count))
    list(Paginator(fake, page_size=page_size))
    expected = [(n, page_size) for n in range(1, count // page_size + 2)]
    assert expected == fake.calls


def test_is_lazy() -> None:
    """Nothing is fetched before iteration, and only page 1 for the first item."""
    fake = FakePages(range(10))
    paginator = Paginator(fake, page_size=3)
    assert [] == fake.calls
    assert 0 == next(iter(paginator))
    assert [(1, 3)] == fake.calls


def test_pages_yields_numbered_non_empty_pages() -> None:
    """`pages()` yields Page objects with their numbers; an empty tail is dropped."""
    pages = list(Paginator(FakePages(range(4)), page_size=2).pages())
    assert [Page(1, (0, 1)), Page(2, (2, 3))] == pages
    assert [2, 2] == [len(p) for p in pages]
    assert [0, 1] == list(pages[0])


def test_iterating_twice_fetches_again() -> None:
    """A paginator can be walked again; it asks for the pages again."""
    fake = FakePages(range(3))
    paginator = Paginator(fake, page_size=2)
    assert list(paginator) == list(paginator)
    assert 4 == len(fake.calls)


@pytest.mark.parametrize("size", [0, -1])
def test_rejects_page_size_below_one(size: int) -> None:
    """A page size below 1 is a ValueError."""
    with pytest.raises(ValueError, match="page_size"):
        Paginator(FakePages([]), page_size=size)


def test_rejects_non_integer_page_size() -> None:
    """A page size that is not an int is a TypeError."""
    with pytest.raises(TypeError):
        Paginator(FakePages([]), page_size=True)


def test_repr_names_the_page_size() -> None:
    """The repr shows the page size."""
    assert "<Paginator page_size=7>" == repr(Paginator(FakePages([]), page_size=7))


def test_keep_filters_items_but_not_the_walk() -> None:
    """`keep` drops items; a page emptied by it does not end the walk early."""
    fake = FakePages(range(10))
    kept = list(Paginator(fake, page_size=3, keep=lambda i: i in (1, 8)))
    assert [1, 8] == kept
    assert [(1, 3), (2, 3), (3, 3), (4, 3)] == fake.calls

"""Errors raised again with what was being done when they happened."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def errors_restated(
    restate: Callable[[Exception], str], types: tuple[type[Exception], ...], *, keep_cause: bool
) -> Iterator[None]:
    """Raise an error of exactly one of ``types`` from the block again, as the same type, with the
    message ``restate(error)`` (``keep_cause``: chained to the error, else in its place).

    A subclass of one of ``types`` goes through unchanged: its constructor may take other
    arguments than a message.
    """
    try:
        yield
    except types as error:
        if type(error) not in types:
            raise
        raise type(error)(restate(error)) from (error if keep_cause else None)

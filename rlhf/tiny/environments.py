"""The tiny world's environments (``tiny:calculator``), written to TRL's ``environment_factory`` contract like any
user's (``rlhf.engine.environments``): the tiny base cannot add two-digit numbers reliably, but with a calculator
it can answer every ``add`` task exactly. The arguments arrive parsed from JSON; nothing evaluates model text."""

from __future__ import annotations


class Calculator:
    """Arithmetic on whole numbers, one call at a time; counts the calls of its episode."""

    def __init__(self):
        self.calls = 0

    def reset(self, **row) -> None:
        self.calls = 0

    def add(self, a: int, b: int) -> int:
        """Add two whole numbers.

        Args:
            a: The first number.
            b: The second number.

        Returns:
            The sum a + b.
        """
        self.calls += 1
        return _whole(a, "a") + _whole(b, "b")

    def subtract(self, a: int, b: int) -> int:
        """Subtract one whole number from another.

        Args:
            a: The number to subtract from.
            b: The number to subtract.

        Returns:
            The difference a - b.
        """
        self.calls += 1
        return _whole(a, "a") - _whole(b, "b")


def schemas() -> list[dict]:
    """The calculator's tools as the chat template gets them (``get_json_schema`` of each, as
    ``rlhf.engine.environments.load`` describes them)."""
    from rlhf.engine import environments

    return list(environments.load("tiny:calculator").schemas)


def _whole(x, name: str) -> int:
    """``x`` as a whole number of at most 30 digits (a bool is not one); else a ValueError the model reads."""
    if isinstance(x, bool) or not isinstance(x, (int, float, str)):
        raise ValueError(f"{name} must be a whole number, got {type(x).__name__}")
    try:
        value = int(x) if not isinstance(x, float) or x.is_integer() else None
    except ValueError:
        value = None
    if value is None or abs(value) >= 10**30:
        raise ValueError(f"{name} must be a whole number below 10**30, got {x!r}")
    return value

"""Config field types: numeric ranges attached to annotations, the error every config problem
raises (its message starts with the dotted key), and what counts as a local path."""

from __future__ import annotations

import typing
from typing import Annotated, Literal, NamedTuple

from jaxdpo.errors import UserError


class Range(NamedTuple):
    """A numeric field's allowed interval, attached with `Annotated[int | float, Range(...)]`."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def check(self, key: str, value) -> None:
        if value is None:
            return
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if too_low and self.high is None:
            fail(key, f"must be {'>' if self.low_open else '>='} {self.low:g}, got {value}")
        if too_low or too_high:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            fail(key, f"must be in {left}{self.low:g}, {self.high:g}{right}, got {value}")


PositiveInt = Annotated[int, Range(0, low_open=True)]
NonNegativeInt = Annotated[int, Range(0)]
PositiveFloat = Annotated[float, Range(0, low_open=True)]
NonNegativeFloat = Annotated[float, Range(0)]

LoraTarget = Literal["q", "k", "v", "o", "gate", "up", "down"]


class ConfigError(UserError, ValueError):
    """A config problem; the message starts with the dotted key."""


def fail(key: str, message: str) -> typing.NoReturn:
    raise ConfigError(f"{key}: {message}")


def is_local(path: str) -> bool:
    """Clearly a filesystem path, not a hub name ("name" or "org/name"): only those can be checked offline."""
    return path.startswith(("/", ".", "~")) or path.count("/") >= 2

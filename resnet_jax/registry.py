"""Named extension points: one registry each for models, optimisers, schedules, data sources,
and a study's samplers and pruners (``resnet_jax.studies.samplers``).

    import optax
    from resnet_jax import models, validation
    from resnet_jax.training import optim

    @models.MODELS.register('tiny')
    def tiny(num_classes, dtype):               # -> a flax module
        return models.ResNet((1,), (8,), 8, num_classes=num_classes, dtype=dtype)

    @optim.OPTIMIZERS.register('rmsprop', fields={'rmsprop_decay': validation.UNIT})
    def rmsprop(config, learning_rate):         # -> an optax.GradientTransformation
        return optax.rmsprop(learning_rate, decay=config.rmsprop_decay)

A config names its choice (``config.model = 'tiny'``); validation, the usage
text and the config docs take their choices from the registries. ``fields``
are the config fields an entry reads, each with its check (see
:mod:`resnet_jax.validation`): a config that lacks one fails validation with
``config.<field> is missing``, not at its first use. This module imports
neither JAX nor Flax.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar('T')

Check = Callable[[Any, str], None]  # (config, dotted field) -> None or ConfigError.


@dataclasses.dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered choice: its name, the object and the config fields it reads."""

    name: str
    value: T
    fields: Mapping[str, Check]


class Registry(Generic[T]):
    """Choices of one kind (``'model'``, ``'optimizer'``, ...) by name, in registration order."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(
        self, name: str, value: T | None = None, *, fields: Mapping[str, Check] | None = None
    ) -> Any:
        """Registers ``value`` as ``name``; without ``value``, a decorator that does.

        Registering a name again replaces the earlier entry.
        """

        def add(obj: T) -> T:
            self._entries[name] = Entry(name, obj, dict(fields or {}))
            return obj

        return add if value is None else add(value)

    def unregister(self, name: str) -> None:
        """Removes ``name`` (if registered)."""
        self._entries.pop(name, None)

    def entry(self, name: str) -> Entry[T]:
        """The entry of ``name``; ``ValueError`` naming the choices if there is none."""
        if name not in self._entries:
            raise ValueError(f'unknown {self.kind} {name!r}; choose one of {self.choices()}')
        return self._entries[name]

    def get(self, name: str) -> T:
        """The registered object of ``name`` (see :meth:`entry`)."""
        return self.entry(name).value

    def fields(self, name: str) -> Mapping[str, Check]:
        """The config fields ``name`` reads, with their checks."""
        return self.entry(name).fields

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def choices(self) -> str:
        """The names as one comma-separated string (for messages and help)."""
        return ', '.join(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f'Registry({self.kind!r}: {self.choices()})'

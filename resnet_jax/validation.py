"""The config's check primitives: one clear sentence per invalid field.

    get_field(config, 'data.path')                 # dotted get (ConfigError if missing)
    set_field(config, 'data.path', '/data/cifar')  # dotted set (ConfigError if missing)

The command line turns a :class:`ConfigError` into ``error: <message>`` on stderr
and exit code 2. A whole run config is checked by
:func:`resnet_jax.training.checks.validate_config`, from these parts.
``get_field`` and ``set_field`` are the one way the package reads and writes a config by a dotted name, on an ``ml_collections.ConfigDict``
or a plain nested dict (a config read back from JSON). The choices of model,
optimiser, schedule and data source, and the fields each of them reads, come
from their registries (:func:`check_registered`); this module imports neither
JAX nor Flax, nor any other part of the package. The checks of registered fields:
:data:`POSITIVE`, :data:`NONNEGATIVE`, :data:`UNIT`, :data:`BOOL`, :data:`COUNT`.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Mapping, MutableMapping
from typing import Any

import ml_collections


class ConfigError(ValueError):
    """An invalid configuration value; the message names the field."""


REQUIRED: Any = object()  # get_field's default: a missing field is an error.


def _is_section(node: Any) -> bool:
    return isinstance(node, ml_collections.ConfigDict | Mapping)


def get_field(
    config: ml_collections.ConfigDict | Mapping[str, Any], field: str, default: Any = REQUIRED
) -> Any:
    """The value of the dotted ``field`` ('data.path') of ``config``.

    A missing field (or a part of its path that is not a section) is
    ``default``, or without one a :class:`ConfigError` 'config.<field> is missing'.
    """
    node: Any = config
    for part in field.split('.'):
        if not _is_section(node) or part not in node:
            if default is REQUIRED:
                raise ConfigError(f'config.{field} is missing')
            return default
        node = node[part]
    return node


def set_field(
    config: ml_collections.ConfigDict | MutableMapping[str, Any],
    field: str,
    value: Any,
    create: bool = False,
) -> None:
    """Sets the dotted ``field`` ('data.path') of ``config`` to ``value``, in place.

    The field must exist (:class:`ConfigError` 'config.<field> is missing'),
    unless ``create``, which adds it and any missing sections (empty dicts) on
    its path. A ConfigDict's ``TypeError`` for a value of the wrong type passes
    through.
    """
    node: Any = config
    *sections, leaf = field.split('.')
    for part in sections:
        if create and part not in node:
            node[part] = {}
        if part not in node or not _is_section(node[part]):
            raise ConfigError(f'config.{field} is missing')
        node = node[part]
    if not create and leaf not in node:
        raise ConfigError(f'config.{field} is missing')
    node[leaf] = value


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    """An int or float (not a bool) that is neither NaN nor infinite."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_int(config, field: str, minimum: int) -> None:
    value = get_field(config, field)
    if not _is_int(value):
        raise ConfigError(f'config.{field} must be an integer, got {value!r}')
    if value < minimum:
        raise ConfigError(f'config.{field} must be >= {minimum}, got {value}')


def check_positive(config, field: str, allow_zero: bool = False) -> None:
    value = get_field(config, field)
    if not is_number(value):
        raise ConfigError(f'config.{field} must be a number, got {value!r}')
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = '>= 0' if allow_zero else '> 0'
        raise ConfigError(f'config.{field} must be a finite number {bound}, got {value}')


def check_choice(config, field: str, choices) -> None:
    value = get_field(config, field)
    if value not in choices:
        raise ConfigError(f'config.{field}={value!r} is not one of {", ".join(map(str, choices))}')


def _check_unit(config, field: str) -> None:
    value = get_field(config, field)
    if not is_number(value) or not 0 <= value < 1:
        raise ConfigError(f'config.{field} must be in [0, 1), got {value!r}')


def _check_bool(config, field: str) -> None:
    value = get_field(config, field)
    if not isinstance(value, bool):
        raise ConfigError(f'config.{field} must be True or False, got {value!r}')


def _check_path_given(config, field: str) -> None:
    if not get_field(config, field):
        source = get_field(config, 'data.source')
        raise ConfigError(f'config.data.source={source!r} needs config.{field}')


# Checks of the fields a registered model, optimiser, schedule or source reads.
POSITIVE = check_positive  # A finite number > 0.
NONNEGATIVE = functools.partial(check_positive, allow_zero=True)  # A finite number >= 0.
UNIT = _check_unit  # A number in [0, 1).
BOOL = _check_bool
COUNT = functools.partial(check_int, minimum=1)  # An integer >= 1.
PATH_GIVEN = _check_path_given  # A data source that reads config.data.path.


def check_registered(config, registry, field: str) -> None:
    """Checks that ``config.<field>`` names an entry of ``registry`` and the fields it reads."""
    check_choice(config, field, registry.names())
    name = get_field(config, field)
    for needed, check in registry.fields(name).items():
        if get_field(config, needed, None) is None:
            raise ConfigError(f'config.{needed} is missing ({field} {name!r} reads it)')
        check(config, needed)


def validate_distributed(config: ml_collections.ConfigDict) -> None:
    """Checks ``config.distributed``, which is read before anything else."""
    if not isinstance(config, ml_collections.ConfigDict):  # What get_config() returned.
        raise ConfigError(
            f'get_config() must return an ml_collections.ConfigDict, got {type(config).__name__}'
        )
    value = get_field(config, 'distributed.enabled')
    if not isinstance(value, bool):
        raise ConfigError(f'config.distributed.enabled must be True or False, got {value!r}')
    for field in ('distributed.coordinator_address', 'distributed.cpu_collectives'):
        value = get_field(config, field)
        if not isinstance(value, str):
            raise ConfigError(f'config.{field} must be a string, got {value!r}')
    check_int(config, 'distributed.num_processes', 1)
    check_int(config, 'distributed.process_id', 0)

"""Field limits and validators shared by the protocol's typed messages.

Every message field is checked when its dataclass is built: type first, then range or
size, with an error naming the field and the allowed range (``TypeError`` or
``ValueError``; `message_from_wire` turns them into ``InvalidMessage``). Nothing here
knows which message a field belongs to, nor anything of frames or sockets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, TypeAlias

from .errors import InvalidMessage

__all__ = [
    "MAX_BYTES_FIELD_LEN",
    "MAX_CHUNKS_PER_UPDATE",
    "MAX_CLIENT_ID_LEN",
    "MAX_COMMITTEE_ENTRIES",
    "MAX_CONFIG_ENTRIES",
    "MAX_CONFIG_KEY_LEN",
    "MAX_CONFIG_STR_LEN",
    "MAX_CONTRIBUTORS_LEN",
    "MAX_FEDERATION_LEN",
    "MAX_INT",
    "MAX_METRIC_ENTRIES",
    "MAX_PUBLIC_KEY_LEN",
    "MAX_REASON_LEN",
    "MAX_STATEMENT_LEN",
    "MAX_STATUS_LEN",
    "MAX_VALUE_BITS",
    "SHA256_DIGEST_LEN",
    "ConfigValue",
    "check_bool",
    "check_bytes",
    "check_bytes_tuple",
    "check_config",
    "check_float",
    "check_int",
    "check_metrics",
    "check_str",
    "pick_fields",
]


# Named limits. Frame-size limits live in framing.py; these bound single fields.
MAX_INT = 2**63 - 1
MAX_REASON_LEN = 1024
MAX_STATUS_LEN = 64
MAX_CLIENT_ID_LEN = 256
MAX_PUBLIC_KEY_LEN = 64 * 1024
MAX_BYTES_FIELD_LEN = 1 << 30  # weights/payloads; the frame limit is the real cap
MAX_CONFIG_ENTRIES = 256
MAX_CONFIG_KEY_LEN = 128
MAX_CONFIG_STR_LEN = 4096
MAX_METRIC_ENTRIES = 256
MAX_CHUNKS_PER_UPDATE = 1_000_000
MAX_VALUE_BITS = 64
SHA256_DIGEST_LEN = 32
# Signed statements (committee credentials, contributor tokens) are opaque bytes here.
MAX_STATEMENT_LEN = 16 * 1024
MAX_COMMITTEE_ENTRIES = 16
# A packed list of contributor tokens: one per contributor of a round.
MAX_CONTRIBUTORS_LEN = 64 * 1024 * 1024
MAX_FEDERATION_LEN = 64 * 1024

ConfigValue: TypeAlias = int | float | str | bool


def check_int(name: str, value: object, lo: int = 0, hi: int = MAX_INT) -> None:
    if type(value) is not int:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")


def check_float(obj: object, name: str, value: object, lo: float = -math.inf) -> None:
    # ints are accepted (msgpack may carry 1 for 1.0) and stored as float
    if type(value) is int:
        value = float(value)
        object.__setattr__(obj, name, value)
    if type(value) is not float:
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value) or value < lo:
        raise ValueError(f"{name} must be a finite float >= {lo}, got {value}")


def check_bool(name: str, value: object) -> None:
    if type(value) is not bool:
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_str(name: str, value: object, max_len: int, *, nonempty: bool = False) -> None:
    if type(value) is not str:
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if len(value) > max_len:
        raise ValueError(f"{name} must be at most {max_len} characters, got {len(value)}")
    if nonempty and not value:
        raise ValueError(f"{name} must not be empty")


def check_bytes(name: str, value: object, max_len: int, exact_len: int | None = None) -> None:
    if type(value) is not bytes:
        raise TypeError(f"{name} must be bytes, got {type(value).__name__}")
    if exact_len is not None and len(value) != exact_len:
        raise ValueError(f"{name} must be exactly {exact_len} bytes, got {len(value)}")
    if len(value) > max_len:
        raise ValueError(f"{name} must be at most {max_len} bytes, got {len(value)}")


def check_bytes_tuple(obj: object, name: str, value: object, max_items: int, max_len: int) -> None:
    if not isinstance(value, list | tuple):
        raise TypeError(f"{name} must be a list of bytes, got {type(value).__name__}")
    if len(value) > max_items:
        raise ValueError(f"{name} must have at most {max_items} entries, got {len(value)}")
    for index, item in enumerate(value):
        check_bytes(f"{name}[{index}]", item, max_len)
    object.__setattr__(obj, name, tuple(value))


def check_config(obj: object, name: str, value: object) -> None:
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict[str, int|float|str|bool]")
    if len(value) > MAX_CONFIG_ENTRIES:
        raise ValueError(f"{name} must have at most {MAX_CONFIG_ENTRIES} entries")
    for key, item in value.items():
        check_str(f"{name} key", key, MAX_CONFIG_KEY_LEN, nonempty=True)
        if type(item) is float:
            if not math.isfinite(item):
                raise ValueError(f"{name}[{key!r}] must be finite, got {item}")
        elif type(item) is int:
            check_int(f"{name}[{key!r}]", item, -MAX_INT, MAX_INT)
        elif type(item) is str:
            check_str(f"{name}[{key!r}]", item, MAX_CONFIG_STR_LEN)
        elif type(item) is not bool:
            raise TypeError(f"{name}[{key!r}] must be int, float, str or bool")
    # a private copy: the message is frozen, the caller's dict is not
    object.__setattr__(obj, name, dict(value))


def check_metrics(obj: object, name: str, value: object) -> None:
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict[str, float]")
    if len(value) > MAX_METRIC_ENTRIES:
        raise ValueError(f"{name} must have at most {MAX_METRIC_ENTRIES} entries")
    copy: dict[str, float] = {}
    for key, item in value.items():
        check_str(f"{name} key", key, MAX_CONFIG_KEY_LEN, nonempty=True)
        if type(item) is int:
            item = float(item)
        if type(item) is not float:
            raise TypeError(f"{name}[{key!r}] must be a float")
        if not math.isfinite(item):
            raise ValueError(f"{name}[{key!r}] must be finite, got {item}")
        copy[key] = item
    object.__setattr__(obj, name, copy)


def pick_fields(
    wire: Mapping[str, Any], cls: type, required: tuple[str, ...], optional: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Pick exactly the known keys from a wire map; unknown or missing keys are invalid."""
    name = cls.__name__
    for key in wire:
        if key not in required and key not in optional:
            raise InvalidMessage(f"{name}: unexpected field {key!r}")
    for key in required:
        if key not in wire:
            raise InvalidMessage(f"{name}: missing field {key!r}")
    return dict(wire)

"""The one rule for adapter names, used by everything that accepts one: registry reading (the
adapter manager refuses to load a version whose name breaks it), registration (`loramux register`,
the admin API, training and onboarding), and the routing dataset build.

A name is 1 to 64 ASCII characters: letters, digits, `-` and `_`, starting with a letter or a
digit; `auto` and `base` (in any case) are reserved for routing and the bare base model. ASCII
matters: a name travels in response headers (`X-Loramux-Adapter`), and HTTP header values are
Latin-1 bytes, so a Unicode letter in a name fails the response after its admission slot is taken.
"""

from __future__ import annotations

import re

from service.errors import AdapterValidationError

MAX_NAME_LENGTH = 64
NAME_PATTERN = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_-]{{0,{MAX_NAME_LENGTH - 1}}}")  # used with fullmatch only
RESERVED_NAMES = frozenset({"auto", "base"})
NAME_RULE = (
    f"must be letters, digits, '-' or '_' (ASCII, at most {MAX_NAME_LENGTH} characters, starting with a letter "
    "or a digit; not 'auto' or 'base')"
)


def name_problem(name: object) -> str | None:
    """Why `name` is not a valid adapter name, or None when it is."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        shown = repr(name) if not isinstance(name, str) or len(name) <= 80 else repr(name[:80] + "...")
        return f"adapter name {shown} {NAME_RULE}"
    if name.lower() in RESERVED_NAMES:
        return f"adapter name {name!r} is reserved: names {NAME_RULE}"
    return None


def is_valid_name(name: object) -> bool:
    return name_problem(name) is None


def check_name(name: object, param: str = "name") -> str:
    """Return `name` if it is valid, else raise the 422 that says why."""
    problem = name_problem(name)
    if problem is not None:
        raise AdapterValidationError(problem, param=param)
    return name  # type: ignore[return-value]

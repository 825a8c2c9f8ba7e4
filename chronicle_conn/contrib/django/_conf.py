"""The ``CHRONICLE_CONNECTIONS`` setting: reading it, and checking it without connecting.

Shaped like Django's ``DATABASES``::

    CHRONICLE_CONNECTIONS = {
        "default": {
            "CONNECTION_STRING": "chronicle://kernel:35000?disableTls=true",
            "OPTIONS": {"retry_attempts": None},  # Connection(...) keyword options
        },
    }

An absent setting means ``{"default": {}}``: one alias, ``ConnectionString.default()``
(``chronicle://localhost:35000``, TLS on) with the library's default options. Every
problem is an :class:`Invalid` whose message fits on one line, names the alias and the
key at fault, says what to change and never contains a secret (connection strings are
only ever quoted redacted, by the library's own messages).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from chronicle_conn import (
    ChronicleConnError,
    ConfigurationError,
    Connection,
    ConnectionString,
    ConnectionStringError,
)
from chronicle_conn._log import Silent

__all__ = [
    "ALIAS_KEYS",
    "DEFAULT_ALIAS",
    "OPTION_NAMES",
    "SETTING",
    "AliasSettings",
    "Invalid",
    "aliases",
    "build",
    "dry_run",
    "parse_alias",
]

#: The name of the Django setting.
SETTING: Final = "CHRONICLE_CONNECTIONS"
#: The alias ``get_connection()`` uses when given none.
DEFAULT_ALIAS: Final = "default"
#: The keys an alias' dict may hold.
ALIAS_KEYS: Final = ("CONNECTION_STRING", "OPTIONS")

#: Check ids, one per kind of problem (see ``checks.py``).
E_SETTING: Final = "chronicle_conn.E001"
E_ALIAS: Final = "chronicle_conn.E002"
E_ALIAS_KEY: Final = "chronicle_conn.E003"
E_CONNECTION_STRING: Final = "chronicle_conn.E004"
E_OPTION_KEY: Final = "chronicle_conn.E005"
E_OPTION_VALUE: Final = "chronicle_conn.E006"
E_DUPLICATE_NAME: Final = "chronicle_conn.E007"

_EXAMPLE: Final = '{"default": {"CONNECTION_STRING": "chronicle://host:35000", "OPTIONS": {}}}'


class Invalid(Exception):
    """One problem with the setting: a check id and a one-line message.

    Attributes:
        id: the system check id (``chronicle_conn.E00x``).
        message: what is wrong and what to change, naming the alias; no secret.
    """

    def __init__(self, id: str, message: str) -> None:
        super().__init__(message)
        self.id = id
        self.message = message


@dataclass(frozen=True)
class AliasSettings:
    """One alias' settings, with the structure checked (the values are not, yet).

    Attributes:
        alias: the alias.
        connection_string: ``CONNECTION_STRING`` (None: ``ConnectionString.default()``).
        options: ``OPTIONS``, the keyword options of :class:`~chronicle_conn.Connection`.
    """

    alias: str
    connection_string: str | ConnectionString | None
    options: Mapping[str, Any] = field(default_factory=dict)

    def where(self, key: str, option: str | None = None) -> str:
        """``CHRONICLE_CONNECTIONS['alias']['KEY']`` (``[...]['option']``), for messages."""
        text = f"{SETTING}[{self.alias!r}][{key!r}]"
        return text if option is None else f"{text}[{option!r}]"


#: The keyword options ``OPTIONS`` may hold: those of ``Connection(...)``, but
#: ``connection_string`` (that is ``CONNECTION_STRING``).
OPTION_NAMES: Final = frozenset(
    name
    for name, parameter in inspect.signature(Connection).parameters.items()
    if parameter.kind is inspect.Parameter.KEYWORD_ONLY
)


def _type(value: object) -> str:
    return type(value).__name__


def _unknown(key: object, valid: Sequence[str]) -> str:
    """``" (did you mean 'X'?); valid keys: ..."`` for an unknown ``key``."""
    text = str(key)
    squashed = {name.replace("_", "").lower(): name for name in valid}
    match = squashed.get(text.replace("_", "").lower())  # "ConnectionString"
    if match is None:
        match = next(iter(difflib.get_close_matches(text, valid, n=1)), None)
    hint = f" (did you mean {match!r}?)" if match is not None else ""
    return f"{hint}; valid keys: {', '.join(valid)}"


def aliases(value: object) -> dict[str, object]:
    """The setting's aliases, each mapped to its (unchecked) dict.

    Args:
        value: the setting as found in ``django.conf.settings`` (``None`` if absent).

    Raises:
        Invalid: the setting is not a dict (E001).
    """
    if value is None:
        return {DEFAULT_ALIAS: {}}
    if not isinstance(value, Mapping):
        raise Invalid(
            E_SETTING,
            f"{SETTING} must be a dict of aliases to connection settings (like DATABASES), "
            f"not {_type(value)}; for example {_EXAMPLE}",
        )
    return dict(value)


def parse_alias(alias: object, entry: object) -> AliasSettings:
    """Check the structure of one alias' dict (its keys and their types).

    Raises:
        Invalid: the alias is not a non-empty str (E002), its value is not a dict (E002),
            it has a key other than ``CONNECTION_STRING`` and ``OPTIONS`` (E003),
            ``CONNECTION_STRING`` is not a str (E004), ``OPTIONS`` is not a dict or holds a
            key that is not a ``Connection`` option (E005).
    """
    if not isinstance(alias, str) or not alias.strip():
        raise Invalid(
            E_ALIAS, f"{SETTING} has the alias {alias!r}; aliases must be non-empty strings"
        )
    if not isinstance(entry, Mapping):
        raise Invalid(
            E_ALIAS,
            f"{SETTING}[{alias!r}] must be a dict with CONNECTION_STRING and OPTIONS, "
            f"not {_type(entry)}",
        )
    for key in entry:
        if key not in ALIAS_KEYS:
            raise Invalid(
                E_ALIAS_KEY,
                f"{SETTING}[{alias!r}] has the unknown key {key!r}" + _unknown(key, ALIAS_KEYS),
            )
    settings = AliasSettings(alias, None)
    cs = entry.get("CONNECTION_STRING")
    if cs is not None and not isinstance(cs, (str, ConnectionString)):
        raise Invalid(
            E_CONNECTION_STRING,
            f"{settings.where('CONNECTION_STRING')} must be a str such as "
            f"'chronicle://host:35000' (or None for the default), not {_type(cs)}",
        )
    options = entry.get("OPTIONS")
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise Invalid(
            E_OPTION_KEY,
            f"{settings.where('OPTIONS')} must be a dict of Connection keyword options, "
            f"not {_type(options)}",
        )
    valid = sorted(OPTION_NAMES)
    for key in options:
        if key == "connection_string":
            raise Invalid(
                E_OPTION_KEY,
                f"{settings.where('OPTIONS')} has the key 'connection_string'; "
                f"give the connection string as {settings.where('CONNECTION_STRING')}",
            )
        if key not in OPTION_NAMES:
            raise Invalid(
                E_OPTION_KEY,
                f"{settings.where('OPTIONS')} has the unknown option {key!r}"
                + _unknown(key, valid),
            )
    return AliasSettings(alias, cs, dict(options))


def build(settings: AliasSettings, **overrides: Any) -> Connection:
    """Construct the alias' :class:`~chronicle_conn.Connection` (``overrides`` win).

    Raises:
        Invalid: the connection string (E004) or an option (E006) is invalid; the
            library's ``ConfigurationError`` is chained.
    """
    options = {**settings.options, **overrides}
    try:
        return Connection(settings.connection_string, **options)
    except ConfigurationError as exc:
        raise _invalid(settings, exc) from exc
    except (TypeError, ValueError, ChronicleConnError) as exc:
        raise Invalid(
            E_OPTION_VALUE,
            f"{SETTING}[{settings.alias!r}] could not be built: {_type(exc)}: {exc}",
        ) from exc


def _invalid(settings: AliasSettings, exc: ConfigurationError) -> Invalid:
    option = exc.option
    if isinstance(exc, ConnectionStringError) or option not in OPTION_NAMES:
        # The string itself, or a value it names (a caPath that is no file, an
        # unsupported scheme...): the fix is in CONNECTION_STRING.
        return Invalid(
            E_CONNECTION_STRING, f"{settings.where('CONNECTION_STRING')} is invalid: {exc}"
        )
    if option in settings.options:
        return Invalid(E_OPTION_VALUE, f"{settings.where('OPTIONS', option)} is invalid: {exc}")
    # An option left at its default that conflicts with one given (reconnect_max_delay
    # below a larger reconnect_base_delay, say).
    return Invalid(E_OPTION_VALUE, f"{settings.where('OPTIONS')} is invalid: {exc}")


def dry_run(settings: AliasSettings) -> None:
    """Validate the alias' values the way ``Connection(...)`` does, without connecting.

    Builds the connection with ``auto_connect=False`` (no thread, no channel, no
    socket) and closes it at once. ``name`` and ``auto_connect`` are checked here
    instead of passed on: the dry run must not take the name in
    :data:`chronicle_conn.registry` from the real connection.

    Raises:
        Invalid: as :func:`build`.
    """
    options = settings.options
    name = options.get("name")
    if name is not None and (not isinstance(name, str) or not name.strip()):
        raise Invalid(
            E_OPTION_VALUE,
            f"{settings.where('OPTIONS', 'name')} must be a non-empty str (a name in "
            f"chronicle_conn.registry) or None, not {name!r}",
        )
    auto_connect = options.get("auto_connect", True)
    if not isinstance(auto_connect, bool):
        raise Invalid(
            E_OPTION_VALUE,
            f"{settings.where('OPTIONS', 'auto_connect')} must be True or False, "
            f"not {auto_connect!r}",
        )
    # Logs nothing and reports no metrics: it is not a connection anyone uses.
    conn = build(settings, auto_connect=False, name=None, logger=Silent(), meter_provider=False)
    conn.close()

"""System checks of ``CHRONICLE_CONNECTIONS`` (``manage.py check``), without connecting.

=====================  ===============================================================
``chronicle_conn.E001``  the setting is not a dict
``chronicle_conn.E002``  an alias is not a non-empty str, or its value is not a dict
``chronicle_conn.E003``  an alias' dict has a key other than CONNECTION_STRING, OPTIONS
``chronicle_conn.E004``  CONNECTION_STRING is not a str, does not parse, or names
                         something this version cannot use (a missing ``caPath``...)
``chronicle_conn.E005``  OPTIONS is not a dict, or has a key that is no option of
                         ``Connection(...)``
``chronicle_conn.E006``  an option's value is invalid
``chronicle_conn.E007``  two aliases register the same ``OPTIONS["name"]``
=====================  ===============================================================

Registered by the app's ``ready()`` under the tag ``chronicle_conn``.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings  # type: ignore[import-untyped, unused-ignore]
from django.core.checks import Error  # type: ignore[import-untyped, unused-ignore]

from . import _conf

__all__ = ["TAG", "check_connections"]

#: The system check tag (``manage.py check --tag chronicle_conn``).
TAG = "chronicle_conn"


def check_connections(app_configs: Any = None, **kwargs: Any) -> list[Any]:
    """Check every alias of ``settings.CHRONICLE_CONNECTIONS``; return the errors.

    Each alias is checked as ``Connection(...)`` would check it, but nothing is
    dialed: the connection is built with ``auto_connect=False`` and closed at once.
    Never raises for a bad setting; every problem is one ``Error``.
    """
    try:
        aliases = _conf.aliases(getattr(settings, _conf.SETTING, None))
    except _conf.Invalid as exc:
        return [_error(exc)]
    errors: list[Any] = []
    names: dict[str, str] = {}
    for alias, entry in aliases.items():
        try:
            parsed = _conf.parse_alias(alias, entry)
            _conf.dry_run(parsed)
        except _conf.Invalid as exc:
            errors.append(_error(exc))
            continue
        except Exception as exc:  # a check reports, it never crashes manage.py
            errors.append(
                Error(
                    f"{_conf.SETTING}[{alias!r}] could not be checked: {type(exc).__name__}: {exc}",
                    id=_conf.E_OPTION_VALUE,
                )
            )
            continue
        name = parsed.options.get("name")
        if name is not None:
            if name in names:
                errors.append(
                    Error(
                        f"{parsed.where('OPTIONS', 'name')} is {name!r}, as for the alias "
                        f"{names[name]!r}; each connection needs its own registry name",
                        id=_conf.E_DUPLICATE_NAME,
                    )
                )
            names.setdefault(name, alias)
    return errors


def _error(exc: _conf.Invalid) -> Any:
    return Error(exc.message, id=exc.id)

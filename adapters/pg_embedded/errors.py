"""The one exception the embedded-PostgreSQL package raises.

Imports: nothing. It lives apart so that every module of the package can raise it without importing
the server, which imports them all.
"""

from __future__ import annotations


class EmbeddedPostgresError(Exception):
    """The embedded PostgreSQL server could not be located, initialised, started or stopped."""

"""What the embedded cluster's own configuration file says.

Imports: stdlib. ``initdb`` leaves postgresql.conf alone except for one appended ``include_if_exists``
line; the settings live in ``lwapi.conf`` beside it, rewritten by every ``ensure_running`` so that a
changed port or socket folder takes effect at the next start.
"""

from __future__ import annotations

from pathlib import Path

SERVER_SETTINGS: dict[str, str] = {
    "listen_addresses": "",
    "unix_socket_permissions": "0700",
    "shared_buffers": "128MB",
    "max_connections": "200",
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "logging_collector": "off",
}
CONFIG_FILE = "lwapi.conf"
INCLUDE_LINE = f"include_if_exists = '{CONFIG_FILE}'  # added by adapters.pg_embedded\n"


def config_text(port: int, socket_dir: Path) -> str:
    """Return the contents of ``lwapi.conf`` for a server on ``port`` with its socket in ``socket_dir``."""
    settings = {
        **SERVER_SETTINGS,
        "port": str(port),
        "unix_socket_directories": f'"{socket_dir}"',
    }
    body = "".join(f"{key} = {_conf_quote(value)}\n" for key, value in settings.items())
    return "# Written by adapters.pg_embedded on every start; edits are lost.\n" + body


def _conf_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"

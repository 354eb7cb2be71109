"""What every `pacs` command group shares: the settings context, `--json`, output."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import click

from .config import Settings, load


def size_text(value: float | None) -> str:
    """Bytes as a person reads them: 512 B, 3.4 MB, 1.2 TB."""
    if value is None:
        return "unknown"
    size, unit = float(value), "B"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1024 or unit == "TB":
            break
        size /= 1024
    return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"


def printable(value: Any, limit: int | None = None) -> str:
    """A value from a header, a message or a peer, safe in a terminal line: control characters
    (escape sequences) shown, not run; cut to `limit` characters when given."""
    text = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in str(value))
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"


def emit(data: Any, as_json: bool, text: str) -> None:
    """JSON for scripts, or the sentence a person reads."""
    click.echo(json.dumps(data, indent=2, default=str) if as_json else text)


class Context:
    """The env file chosen on the command line; settings are loaded on first use."""

    def __init__(self, env_file: Path) -> None:
        self.env_file = env_file
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load(self.env_file)
        return self._settings


pass_context = click.make_pass_decorator(Context)


def as_state_owner(settings: Settings) -> None:
    """Root at the console acts as the services that own STATE_PATH.

    On the appliance the services run as their own user; a file an administrator's
    `pacs hq site add` or `pacs sync prioritize` created as root (a credentials file, a
    database's journal) would lock the service out of its own state. Commands that write the
    state therefore drop root for the state's owner first; elsewhere (development, tests)
    nothing changes.
    """
    if os.geteuid() != 0:
        return
    try:
        owner = settings.state_path.stat()
    except FileNotFoundError:
        return
    if owner.st_uid == 0:
        return
    os.setgroups([])
    os.setgid(owner.st_gid)
    os.setuid(owner.st_uid)


json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def matching(pattern: str, allowed: str):
    """A click callback accepting a value that fully matches `pattern` (None passes: an
    option not given), else saying what is allowed."""

    def check(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(pattern, value):
            raise click.BadParameter(allowed)
        return value

    return check

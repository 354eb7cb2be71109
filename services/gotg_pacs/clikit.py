"""What every `pacs` command group shares: the settings context, `--json`, output."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click

from .config import Settings, load


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
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def matching(pattern: str, allowed: str):
    """A click callback accepting a value that fully matches `pattern` (None passes: an
    option not given), else saying what is allowed."""

    def check(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(pattern, value):
            raise click.BadParameter(allowed)
        return value

    return check

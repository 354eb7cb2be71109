"""The `pacs` command line contract: every command speaks JSON, config errors exit 2."""

from __future__ import annotations

import json

import click

from gotg_pacs.cli import cli
from tests.conftest import run_pacs


def _leaves(group: click.Group, prefix: str = ""):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _leaves(command, f"{prefix}{name} ")
        else:
            yield f"{prefix}{name}", command


def test_every_command_has_json():
    missing = [name for name, command in _leaves(cli)
               if "--json" not in {opt for p in command.params for opt in p.opts}]
    assert not missing, f"commands without --json: {missing}"


def test_config_check_json_hides_secrets(tmp_path):
    env = tmp_path / "pacs.env"
    env.write_text("ADMIN_PASSWORD=very-secret-pw\nRIS_API_KEY=key-123\n")
    result = run_pacs("config", "check", "--json", env_file=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert report["settings"]["ADMIN_PASSWORD"] == "(hidden)"
    assert report["settings"]["RIS_API_KEY"] == "(hidden)"
    assert "very-secret-pw" not in result.stdout and "key-123" not in result.stdout


def test_config_ansible_vars_gives_a_usb_update_the_boxs_own_secrets(tmp_path):
    # A USB bundle carries no secret: the box hands its own to the playbook, into a 0600 file.
    env = tmp_path / "pacs.env"
    env.write_text('ADMIN_PASSWORD="very secret pw"\nPACS_AET=MOBILE3\nHQ_TOKEN=tok-9\n')
    out = tmp_path / "secrets.json"
    result = run_pacs("config", "ansible-vars", "--secrets-only", "--out", str(out),
                      "--json", env_file=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text()) == {"pacs_config_admin_password": "very secret pw",
                                           "pacs_config_hq_token": "tok-9"}
    assert out.stat().st_mode & 0o777 == 0o600
    assert "very secret pw" not in result.stdout and "tok-9" not in result.stdout
    every = tmp_path / "all.json"
    assert run_pacs("config", "ansible-vars", "--out", str(every), env_file=env).returncode == 0
    assert json.loads(every.read_text())["pacs_config_pacs_aet"] == "MOBILE3"
    env.write_text("ADMIN_PASSWORD=very-secret-pw\nDICOM_PORT=http\n")
    refused = run_pacs("config", "ansible-vars", "--out", str(tmp_path / "x.json"), env_file=env)
    assert refused.returncode == 2 and not (tmp_path / "x.json").exists()


def test_config_error_is_exit_2_and_one_line_for_every_command(tmp_path):
    env = tmp_path / "pacs.env"
    env.write_text("DICOM_PORT=http\n")
    for args in (["status"], ["config", "check"], ["config", "orthanc"], ["modality", "list"],
                 ["archive", "--external", str(tmp_path)]):
        result = run_pacs(*args, env_file=env)
        assert result.returncode == 2, args
        assert result.stderr.count("\n") == 1 and "DICOM_PORT='http'" in result.stderr


def test_reference_json_lists_every_key():
    result = run_pacs("config", "reference", "--json")
    keys = [entry["key"] for entry in json.loads(result.stdout)]
    assert "PACS_AET" in keys and "ADMIN_PASSWORD" in keys and len(keys) == len(set(keys))


def test_config_shows_no_postgresql_password(tmp_path):
    env = tmp_path / "pacs.env"
    env.write_text("ADMIN_PASSWORD=very-secret-pw\nORTHANC_INDEX=postgresql\n"
                   "POSTGRESQL_PASSWORD=db-secret-pw\n")
    checked = run_pacs("config", "check", "--json", env_file=env)
    assert json.loads(checked.stdout)["settings"]["POSTGRESQL_PASSWORD"] == "(hidden)"
    rendered = run_pacs("config", "orthanc", env_file=env)
    assert rendered.returncode == 0, rendered.stderr
    uri = json.loads(rendered.stdout)["PostgreSQL"]["ConnectionUri"]
    assert uri.startswith("postgresql://orthanc:(hidden)@localhost:5432/orthanc")
    for result in (checked, rendered):
        assert "db-secret-pw" not in result.stdout + result.stderr

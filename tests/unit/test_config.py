"""The one settings model: what site IT writes in pacs.env, and what it is told when it is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from gotg_pacs import config
from gotg_pacs.config import ConfigError, Settings, load, parse_values, schema


def _env(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "pacs.env"
    path.write_text(text)
    return path


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_every_design_name_is_a_setting():
    """The names users and scripts already rely on (design brief, section 4)."""
    names = {info.env for info in schema()}
    assert {"PACS_NAME", "PACS_AET", "DICOM_PORT", "HTTP_PORT", "STORAGE_PATH", "MAX_STORAGE_GB",
            "AUTO_CLEANUP", "RETENTION_DAYS", "OFFLINE_MODE", "SYNC_INTERVAL",
            "MAX_BANDWIDTH_MBPS", "COMPRESSION_LEVEL", "RIS_URL", "RIS_API_KEY", "WORKLIST_SYNC",
            "BACKUP_ENABLED", "BACKUP_INTERVAL", "BACKUP_PATH", "REMOTE_BACKUP_URL",
            "ENABLE_AUTH", "ADMIN_PASSWORD", "ENCRYPTION", "HQ_URL", "SITE_CODE"} <= names


def test_every_setting_is_documented_with_a_section_and_allowed_values():
    for info in schema():
        assert info.env.isupper() and info.doc.endswith(".") and info.section
        assert info.kind.allowed


def test_defaults_are_the_documented_ones():
    settings = Settings()
    assert (settings.pacs_aet, settings.dicom_port, settings.http_port) == ("GOTG_PACS", 4242, 8042)
    assert settings.backup_interval == 6 * 3600
    assert settings.dicom_access == "standard"
    assert settings.enable_auth is True and settings.admin_password == ""


def test_a_full_file_parses_to_typed_values(tmp_path):
    env = _env(tmp_path, """
# a comment
PACS_NAME="Mobile clinic 3 # Gaza"
export PACS_AET=MOBILE3
DICOM_PORT=11112
STORAGE_PATH=data/orthanc
BACKUP_INTERVAL=90m
AUTO_CLEANUP=yes
MAX_BANDWIDTH_MBPS=0.5
ADMIN_PASSWORD='s3cret pass'
HQ_URL=https://hq.example.org/sync
HQ_TOKEN=site-token
SITE_CODE=mobile-3
""")
    settings = load(env)
    assert settings.pacs_name == "Mobile clinic 3 # Gaza"
    assert settings.pacs_aet == "MOBILE3"
    assert settings.dicom_port == 11112
    assert settings.storage_path == (tmp_path / "data/orthanc").resolve()
    assert settings.backup_interval == 5400
    assert settings.auto_cleanup is True
    assert settings.max_bandwidth_mbps == 0.5
    assert settings.admin_password == "s3cret pass"


@pytest.mark.parametrize("line, expected", [
    ("DICOM_PORT=abc", "DICOM_PORT='abc' is not a whole number; allowed: a TCP port 1-65535"),
    ("DICOM_PORT=70000", "DICOM_PORT='70000' is outside 1..65535"),
    ("PACS_AET=HAS SPACE", "PACS_AET='HAS SPACE' is not a valid AE title"),
    ("PACS_AET=", "PACS_AET='' is not a valid AE title"),
    ("AUTO_CLEANUP=maybe", "AUTO_CLEANUP='maybe' is not true or false; allowed: true or false"),
    ("OFFLINE_MODE=sometimes", "allowed: auto or offline"),
    ("BACKUP_INTERVAL=5m", "BACKUP_INTERVAL='5m' is outside 900s..604800s"),
    ("SYNC_INTERVAL=soon", "SYNC_INTERVAL='soon' is not a duration"),
    ("HQ_URL=hq.example.org", "HQ_URL='hq.example.org' is not a URL"),
    ("SITE_CODE=Clinic 1", "SITE_CODE='Clinic 1' has characters that are not allowed"),
    ("REMOTE_BACKUP_URL=/mnt/x", "allowed: ssh://[user@]host[:port]/path (a plain folder"),
    # Would reach HQ's authorized_keys line (`pacs backup key`) as extra options.
    ('REMOTE_BACKUP_URL=ssh://hq/r",port-forwarding,x="', "allowed: ssh://[user@]host"),
    ("MAX_STORAGE_GB=-1", "MAX_STORAGE_GB='-1' is outside 0..1e+06"),
    ("MAX_STORAGE_GB=nan", "is outside"),
])
def test_a_bad_value_is_one_line_naming_key_line_and_what_is_allowed(tmp_path, line, expected):
    env = _env(tmp_path, f"PACS_NAME=x\n{line}\n")
    with pytest.raises(ConfigError) as exc:
        load(env)
    message = _one_line(exc)
    assert message.startswith(f"{env}:2: ")
    assert expected in message


def test_a_secret_is_never_echoed_in_an_error(tmp_path):
    env = _env(tmp_path, "RIS_API_KEY=" + "k" * 600 + "\n")
    with pytest.raises(ConfigError) as exc:
        load(env)
    assert "kkkk" not in str(exc.value) and "(hidden)" in str(exc.value)


def test_an_unknown_key_is_named_with_the_closest_known_one(tmp_path):
    env = _env(tmp_path, "ENABLE_AUTH=false\nBACKUP_INTERVALL=6h\n")
    with pytest.raises(ConfigError) as exc:
        load(env)
    message = _one_line(exc)
    assert message.startswith(
        f"{env}:2: unknown key BACKUP_INTERVALL (did you mean BACKUP_INTERVAL?)")
    assert "known keys: ADMIN_PASSWORD" in message


def test_a_key_set_twice_is_refused(tmp_path):
    env = _env(tmp_path, "DICOM_PORT=4242\nENABLE_AUTH=false\nDICOM_PORT=4243\n")
    with pytest.raises(ConfigError) as exc:
        load(env)
    assert _one_line(exc) == f"{env}:3: DICOM_PORT is set twice (first on line 1)"


def test_a_line_that_is_not_key_value_is_refused(tmp_path):
    env = _env(tmp_path, "ENABLE_AUTH=false\nthis is not a setting\n")
    with pytest.raises(ConfigError) as exc:
        load(env)
    assert _one_line(exc).startswith(f"{env}:2: cannot read this line")


def test_an_unreadable_secret_line_names_the_key_not_the_secret(tmp_path):
    env = _env(tmp_path, 'ENABLE_AUTH=false\nADMIN_PASSWORD="hunter2 pw\n')
    with pytest.raises(ConfigError) as exc:
        load(env)
    assert _one_line(exc) == \
        f"{env}:2: cannot read the value of ADMIN_PASSWORD (an unclosed quote?)"
    assert "hunter2" not in str(exc.value)


def test_quoted_spaces_in_a_password_are_kept(tmp_path):
    env = _env(tmp_path, 'ADMIN_PASSWORD=" padded pass "\n')
    assert load(env).admin_password == " padded pass "


def test_auth_without_a_password_is_refused_there_is_no_default(tmp_path):
    env = _env(tmp_path, "ENABLE_AUTH=true\n")
    with pytest.raises(ConfigError) as exc:
        load(env)
    assert "ADMIN_PASSWORD must be set when ENABLE_AUTH is true" in _one_line(exc)
    env = _env(tmp_path, "ADMIN_PASSWORD=short\n")
    with pytest.raises(ConfigError, match="at least 8 characters"):
        load(env)


def test_syncing_to_hq_needs_the_sites_own_code(tmp_path):
    env = _env(tmp_path, "ENABLE_AUTH=false\nHQ_URL=https://hq.example.org\nHQ_TOKEN=t\n")
    with pytest.raises(ConfigError, match="SITE_CODE must be this site's own code"):
        load(env)
    env = _env(tmp_path, "ENABLE_AUTH=false\nHQ_URL=https://hq.example.org\nSITE_CODE=x-1\n")
    with pytest.raises(ConfigError, match="HQ_TOKEN must be set when HQ_URL is set"):
        load(env)


def test_same_port_twice_is_refused(tmp_path):
    env = _env(tmp_path, "ENABLE_AUTH=false\nDICOM_PORT=8042\n")
    with pytest.raises(ConfigError, match="HTTP_PORT is the same port as DICOM_PORT"):
        load(env)
    env = _env(tmp_path, "ENABLE_AUTH=false\nHTTP_REDIRECT_PORT=443\n")
    with pytest.raises(ConfigError, match="HTTP_REDIRECT_PORT is the same port as HTTPS_PORT"):
        load(env)
    env = _env(tmp_path, "ENABLE_AUTH=false\nHTTPS_PORT=4242\n")
    with pytest.raises(ConfigError, match="HTTPS_PORT is the same port as DICOM_PORT"):
        load(env)
    assert load(_env(tmp_path, "ENABLE_AUTH=false\nHTTP_REDIRECT_PORT=0\n")).http_redirect_port == 0


@pytest.mark.parametrize("url, accepted", [
    ("https://hq.example.org/sync", True),
    ("http://127.0.0.1:7000", True),
    ("http://localhost:7000", True),
    ("http://10.8.0.1:7000", True),          # HQ across the clinic's VPN
    ("http://[fd00::1]:7000", True),
    ("http://hq.example.org/sync", False),   # a name could be anywhere: the token in clear
    ("http://41.76.108.46/sync", False),
    ("http://8.8.8.8/sync", False),
])
def test_the_sites_credential_never_crosses_the_internet_in_clear(tmp_path, url, accepted):
    env = _env(tmp_path, f"ENABLE_AUTH=false\nSITE_CODE=x-1\nHQ_TOKEN=t\nHQ_URL={url}\n")
    if accepted:
        assert load(env).hq_url == url
    else:
        with pytest.raises(ConfigError, match="HQ_URL must be https://"):
            load(env)


def test_hq_ca_file_must_exist(tmp_path):
    env = _env(tmp_path, "ENABLE_AUTH=false\nHQ_CA_FILE=hq-root.crt\n")
    with pytest.raises(ConfigError, match="HQ_CA_FILE .*hq-root.crt is not a file"):
        load(env)
    (tmp_path / "hq-root.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    assert load(env).hq_ca_file == tmp_path / "hq-root.crt"


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load(tmp_path / "nope.env")
    assert _one_line(exc) == f"{tmp_path / 'nope.env'}: configuration file not found"


def test_the_env_variable_chooses_the_file(tmp_path, monkeypatch):
    env = _env(tmp_path, "ENABLE_AUTH=false\nPACS_NAME=From variable\n")
    monkeypatch.setenv(config.ENV_FILE_VARIABLE, str(env))
    assert load().pacs_name == "From variable"


def test_the_dev_env_file_in_the_repository_is_valid():
    settings = load(Path(__file__).resolve().parents[2] / "pacs.dev.env")
    assert settings.dicom_access == "open" and settings.enable_auth is False


def test_parse_values_accepts_the_documented_defaults_verbatim():
    values = {info.env: info.default_text for info in schema()}
    values["ADMIN_PASSWORD"] = "long-enough-password"
    settings = parse_values(values, base_dir=Path("/"))
    assert settings == Settings(admin_password="long-enough-password")


def test_clinics_keep_sqlite_and_hq_names_its_postgresql(tmp_path):
    assert Settings().orthanc_index == "sqlite"
    env = _env(tmp_path, "ENABLE_AUTH=false\nORTHANC_INDEX=PostgreSQL\nPOSTGRESQL_HOST=db.hq\n"
                         "POSTGRESQL_PORT=5433\nPOSTGRESQL_DATABASE=orthanc_hq\n"
                         "POSTGRESQL_USER=orthanc\nPOSTGRESQL_PASSWORD='pass with spaces'\n")
    settings = load(env)
    assert (settings.orthanc_index, settings.postgresql_host, settings.postgresql_port,
            settings.postgresql_database, settings.postgresql_password) == \
        ("postgresql", "db.hq", 5433, "orthanc_hq", "pass with spaces")


@pytest.mark.parametrize("line, expected", [
    ("ORTHANC_INDEX=mysql", "ORTHANC_INDEX='mysql' is not one of the allowed values; "
                            "allowed: sqlite or postgresql"),
    ("POSTGRESQL_PORT=0", "POSTGRESQL_PORT='0' is outside 1..65535"),
    ("POSTGRESQL_DATABASE=Orthanc DB", "POSTGRESQL_DATABASE='Orthanc DB' has characters that "
                                       "are not allowed"),
    ("POSTGRESQL_USER=", "POSTGRESQL_USER='' must not be empty"),
    ("POSTGRESQL_HOST=db host", "POSTGRESQL_HOST='db host' has characters"),
])
def test_a_bad_index_setting_names_its_line_and_key(tmp_path, line, expected):
    env = _env(tmp_path, f"ENABLE_AUTH=false\n{line}\n")
    with pytest.raises(ConfigError) as exc:
        load(env)
    message = _one_line(exc)
    assert message.startswith(f"{env}:2: ") and expected in message


def test_postgresql_needs_a_password_unless_it_logs_in_through_the_socket(tmp_path):
    env = _env(tmp_path, "ENABLE_AUTH=false\nORTHANC_INDEX=postgresql\n")
    with pytest.raises(ConfigError) as exc:
        load(env)
    assert _one_line(exc) == (f"{env}: POSTGRESQL_PASSWORD must be set when ORTHANC_INDEX is "
                              "postgresql (or log in through the server's socket folder, e.g. "
                              "POSTGRESQL_HOST=/run/postgresql)")
    env = _env(tmp_path, "ENABLE_AUTH=false\nORTHANC_INDEX=postgresql\nPOSTGRESQL_PASSWORD=\n")
    with pytest.raises(ConfigError, match=f"^{env}:3: POSTGRESQL_PASSWORD must be set"):
        load(env)
    env = _env(tmp_path, "ENABLE_AUTH=false\nORTHANC_INDEX=postgresql\n"
                         "POSTGRESQL_HOST=/run/postgresql\n")
    assert load(env).postgresql_host == "/run/postgresql"


def test_the_postgresql_password_is_a_secret_never_echoed(tmp_path):
    [info] = [i for i in schema() if i.env == "POSTGRESQL_PASSWORD"]
    assert info.secret
    env = _env(tmp_path, "POSTGRESQL_PASSWORD=" + "p" * 200 + "\n")
    with pytest.raises(ConfigError) as exc:
        load(env)
    assert "pppp" not in str(exc.value) and "POSTGRESQL_PASSWORD=(hidden)" in str(exc.value)

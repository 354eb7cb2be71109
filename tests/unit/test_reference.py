"""Docs and deployment files derived from the settings model stay in step with it."""

from __future__ import annotations

from pathlib import Path

import yaml

from gotg_pacs import reference
from gotg_pacs.config import load, schema

REPO = Path(__file__).resolve().parents[2]


def test_committed_generated_files_are_current():
    stale = [str(path.relative_to(REPO))
             for path, content in reference.generated_files(REPO).items()
             if not path.exists() or path.read_text() != content]
    assert not stale, f"run `make reference`: stale {stale}"


def test_readme_config_reference_is_current():
    readme = (REPO / "README.md").read_text()
    assert reference.readme_with_reference(readme) == readme, "run `make reference`"
    for info in schema():
        assert f"| `{info.env}` |" in readme


def test_sample_env_file_loads_to_the_defaults(tmp_path):
    sample = (REPO / "pacs.env.example").read_text()
    env = tmp_path / "pacs.env"
    env.write_text(sample.replace("ADMIN_PASSWORD=\n", "ADMIN_PASSWORD=long-enough-pw\n"))
    settings = load(env)
    assert settings.pacs_aet == "GOTG_PACS" and settings.backup_interval == 6 * 3600


def test_role_defaults_and_argument_specs_cover_every_setting():
    defaults = yaml.safe_load((REPO / reference.ROLE_DIR / "defaults/main.yml").read_text())
    specs = yaml.safe_load((REPO / reference.ROLE_DIR / "meta/argument_specs.yml").read_text())
    options = specs["argument_specs"]["main"]["options"]
    for info in schema():
        variable = reference.role_variable(info)
        assert defaults[variable] == info.default_text
        assert options[variable]["default"] == info.default_text
        assert options[variable]["type"] == "str"
        assert options[variable].get("no_log", False) == info.secret

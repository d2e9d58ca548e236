"""
Tests for client settings: environment fallbacks, precedence and credentials.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kelpie_sdk.config import DEFAULT_API_URL, Settings
from kelpie_sdk.errors import ConfigError


def test_defaults_without_environment() -> None:
    """An empty environment gives the local default URL and no credentials."""
    assert Settings() == Settings.from_env({})
    assert DEFAULT_API_URL == Settings.from_env({}).api_url


def test_reads_every_variable() -> None:
    """Each KELPIE_*/SALAD_* variable fills its setting."""
    settings = Settings.from_env(
        {
            "KELPIE_API_URL": "http://kelpie.test:9000/",
            "KELPIE_API_KEY": "k",
            "SALAD_API_KEY": "s",
            "SALAD_ORGANIZATION": "org",
            "SALAD_PROJECT": "proj",
        }
    )
    expected = Settings(
        api_url="http://kelpie.test:9000",
        api_key="k",
        salad_api_key="s",
        salad_organization="org",
        salad_project="proj",
    )
    assert expected == settings


def test_salad_name_variants_are_fallbacks() -> None:
    """SALAD_*_NAME are used only when the short variables are unset."""
    env = {"SALAD_ORGANIZATION_NAME": "o2", "SALAD_PROJECT_NAME": "p2"}
    assert ("o2", "p2") == (
        Settings.from_env(env).salad_organization,
        Settings.from_env(env).salad_project,
    )
    env |= {"SALAD_ORGANIZATION": "o1", "SALAD_PROJECT": "p1"}
    assert ("o1", "p1") == (
        Settings.from_env(env).salad_organization,
        Settings.from_env(env).salad_project,
    )


def test_empty_variables_count_as_unset() -> None:
    """An empty KELPIE_API_URL falls back to the default."""
    assert DEFAULT_API_URL == Settings.from_env({"KELPIE_API_URL": ""}).api_url


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an explicit mapping, os.environ is read (at call time)."""
    monkeypatch.setenv("KELPIE_API_KEY", "from-env")
    assert "from-env" == Settings.from_env().api_key


@given(
    env_value=st.none() | st.text(min_size=1, alphabet="abc"),
    arg_value=st.none() | st.text(min_size=1, alphabet="xyz"),
)
def test_argument_beats_environment(
    env_value: str | None, arg_value: str | None
) -> None:
    """An explicit argument wins over the variable, which wins over the default."""
    env = {} if env_value is None else {"KELPIE_API_KEY": env_value}
    settings = Settings.from_env(env).override(api_key=arg_value)
    expected = arg_value if arg_value is not None else env_value
    assert expected == settings.api_key


def test_kelpie_key_header() -> None:
    """An API key is sent as X-Kelpie-Key, even when a Salad key is also set."""
    settings = Settings(api_key="k", salad_api_key="s")
    assert {"X-Kelpie-Key": "k"} == settings.auth_headers()


def test_salad_headers() -> None:
    """A Salad key is sent with its organization and project."""
    settings = Settings(salad_api_key="s", salad_organization="o", salad_project="p")
    expected = {"Salad-Api-Key": "s", "Salad-Organization": "o", "Salad-Project": "p"}
    assert expected == settings.auth_headers()


@pytest.mark.parametrize(
    ("org", "project", "missing"),
    [
        (None, "p", "salad_organization= (or SALAD_ORGANIZATION"),
        ("o", None, "salad_project= (or SALAD_PROJECT"),
        (None, None, "salad_organization= (or SALAD_ORGANIZATION"),
    ],
)
def test_salad_key_needs_org_and_project(
    org: str | None, project: str | None, missing: str
) -> None:
    """A Salad key without organization or project is a ConfigError naming them."""
    settings = Settings(
        salad_api_key="s", salad_organization=org, salad_project=project
    )
    with pytest.raises(ConfigError, match=missing.replace("(", r"\(")):
        settings.auth_headers()


def test_no_credentials_names_arguments_and_variables() -> None:
    """Without credentials the error names both the arguments and the variables."""
    with pytest.raises(ConfigError) as info:
        Settings().auth_headers()
    for name in ("api_key=", "KELPIE_API_KEY", "salad_api_key=", "SALAD_API_KEY"):
        assert name in str(info.value)


def test_secrets_are_not_in_the_repr() -> None:
    """The repr never shows keys."""
    text = repr(Settings(api_key="secret-k", salad_api_key="secret-s"))
    assert "secret" not in text

"""
Client-side settings and where they come from.

Precedence, highest first: an explicit argument to ``Client(...)``, then the
environment variable, then the default. The environment is read only by
``Settings.from_env``, which ``Client.__init__`` calls; nothing is read at
import time.

=========================  ===============================  =========================
Argument                   Environment variable             Default
=========================  ===============================  =========================
``base_url``               ``KELPIE_API_URL``               ``http://127.0.0.1:8787``
``api_key``                ``KELPIE_API_KEY``               none
``salad_api_key``          ``SALAD_API_KEY``                none
``salad_organization``     ``SALAD_ORGANIZATION``,          none
                           else ``SALAD_ORGANIZATION_NAME``
``salad_project``          ``SALAD_PROJECT``,               none
                           else ``SALAD_PROJECT_NAME``
=========================  ===============================  =========================

Credentials: ``api_key`` sends ``X-Kelpie-Key``; otherwise ``salad_api_key``
sends ``Salad-Api-Key`` together with ``Salad-Organization`` and
``Salad-Project`` (both required then). Without either, ``ConfigError``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import attrs

from kelpie_sdk.errors import ConfigError

__all__ = [
    "API_KEY_ENV",
    "API_URL_ENV",
    "CREDENTIAL_HEADERS",
    "DEFAULT_API_URL",
    "SALAD_API_KEY_ENV",
    "SALAD_ORGANIZATION_ENVS",
    "SALAD_PROJECT_ENVS",
    "Settings",
]

DEFAULT_API_URL = "http://127.0.0.1:8787"
API_URL_ENV = "KELPIE_API_URL"
API_KEY_ENV = "KELPIE_API_KEY"
SALAD_API_KEY_ENV = "SALAD_API_KEY"
SALAD_ORGANIZATION_ENVS = ("SALAD_ORGANIZATION", "SALAD_ORGANIZATION_NAME")
SALAD_PROJECT_ENVS = ("SALAD_PROJECT", "SALAD_PROJECT_NAME")

#: Header names whose values are secrets (masked in logs).
CREDENTIAL_HEADERS = frozenset({"x-kelpie-key", "salad-api-key", "authorization"})


def _first(environ: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = environ.get(name)
        if value:
            return value
    return None


def _strip_slash(url: str) -> str:
    return str(url).rstrip("/")


@attrs.frozen(kw_only=True)
class Settings:
    """
    Where the API is and how to authenticate to it.

    Attributes:
        api_url: The server's base URL, without a trailing slash.
        api_key: A Kelpie key (``X-Kelpie-Key``).
        salad_api_key: A SaladCloud API key, the alternative to ``api_key``.
        salad_organization: The SaladCloud organization (with ``salad_api_key``).
        salad_project: The SaladCloud project (with ``salad_api_key``).
    """

    api_url: str = attrs.field(default=DEFAULT_API_URL, converter=_strip_slash)
    api_key: str | None = attrs.field(default=None, repr=False)
    salad_api_key: str | None = attrs.field(default=None, repr=False)
    salad_organization: str | None = None
    salad_project: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """
        Read the settings from environment variables.

        Args:
            environ: The environment to read; ``os.environ`` when ``None``.

        Returns:
            The settings, with defaults where a variable is unset or empty.
        """
        env = os.environ if environ is None else environ
        return cls(
            api_url=_first(env, API_URL_ENV) or DEFAULT_API_URL,
            api_key=_first(env, API_KEY_ENV),
            salad_api_key=_first(env, SALAD_API_KEY_ENV),
            salad_organization=_first(env, *SALAD_ORGANIZATION_ENVS),
            salad_project=_first(env, *SALAD_PROJECT_ENVS),
        )

    def override(
        self,
        *,
        api_url: str | None = None,
        api_key: str | None = None,
        salad_api_key: str | None = None,
        salad_organization: str | None = None,
        salad_project: str | None = None,
    ) -> Settings:
        """
        Return a copy in which every argument that is not ``None`` wins.
        """
        changes = {
            k: v
            for k, v in {
                "api_url": api_url,
                "api_key": api_key,
                "salad_api_key": salad_api_key,
                "salad_organization": salad_organization,
                "salad_project": salad_project,
            }.items()
            if v is not None
        }
        return attrs.evolve(self, **changes)

    def auth_headers(self) -> dict[str, str]:
        """
        The credential headers for every request.

        Returns:
            ``X-Kelpie-Key`` if there is an API key, else the three Salad headers.

        Raises:
            ConfigError: No credentials, or a Salad key without organization or
                project.
        """
        if self.api_key:
            return {"X-Kelpie-Key": self.api_key}
        if self.salad_api_key:
            org, project = self.salad_organization, self.salad_project
            if not org or not project:
                missing = []
                if not org:
                    envs = " / ".join(SALAD_ORGANIZATION_ENVS)
                    missing.append(f"salad_organization= (or {envs})")
                if not project:
                    envs = " / ".join(SALAD_PROJECT_ENVS)
                    missing.append(f"salad_project= (or {envs})")
                raise ConfigError(
                    "a SaladCloud API key also needs " + " and ".join(missing)
                )
            return {
                "Salad-Api-Key": self.salad_api_key,
                "Salad-Organization": org,
                "Salad-Project": project,
            }
        raise ConfigError(
            f"no API credentials: pass api_key= (or set {API_KEY_ENV}), or "
            f"salad_api_key= with salad_organization= and salad_project= (or set "
            f"{SALAD_API_KEY_ENV}, {SALAD_ORGANIZATION_ENVS[0]} and "
            f"{SALAD_PROJECT_ENVS[0]})"
        )

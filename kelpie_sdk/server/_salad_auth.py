"""
SaladCloud credentials: workload tokens and SaladCloud API keys.

Both are off unless configured (``kelpie server --salad-jwks-url``,
``--salad-api-key-validator``); a server without them refuses them with 403.

- A workload token (``Authorization: Bearer <jwt>`` with ``Salad-Project``) is
  verified against the JWKS at a configured URL: signature (asymmetric keys
  only), expiry, not-before, the audience when one is configured, and the
  ``salad_organization_name`` claim, which must be one of the allowed
  organizations. A ``salad_project_name`` claim must match the header.
- A SaladCloud API key (``Salad-Api-Key`` with ``Salad-Organization`` and
  ``Salad-Project``) goes to a validator function the operator names
  (``module:function``); it returns the organization the key belongs to, or
  ``None`` to refuse it.

Either way the caller's tenant is its organization: one user per organization,
whose id is derived from the name (so no organization can map to the admin or
to a user the admin created) and which is created on first sight, with the
organization's name as its username. Principals from these credentials are
ordinary users, never the admin.

The JWKS is fetched with a timeout, cached for ``jwks_ttl`` seconds, and
fetched again when a token names an unknown key, at most once every
``min_refresh`` seconds (tokens with made-up key ids cannot make the server
fetch in a loop). While the JWKS cannot be fetched and no copy is cached, the
answer is 503: the token may be good, so the caller should retry, not give up.
The fetch blocks the request that triggers it (at most ``jwks_timeout``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import ipaddress
import json
import logging
import os
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Mapping
from urllib.parse import urlsplit

import attrs
import jwt

from kelpie_sdk.errors import ConfigError
from kelpie_sdk.server._store import Principal, Store

__all__ = [
    "JWKSCache",
    "SaladAuth",
    "SaladAuthError",
    "SaladAuthSettings",
    "add_salad_auth_arguments",
    "load_validator",
    "salad_auth_settings",
    "tenant_user_id",
]

logger = logging.getLogger(__name__)

#: Claims a workload token carries (SaladCloud's names).
ORG_CLAIM = "salad_organization_name"
PROJECT_CLAIM = "salad_project_name"

#: Signature algorithms accepted: asymmetric only (a JWKS is public).
_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"}
)
_ASYMMETRIC = frozenset({"RSA", "EC", "OKP"})

#: The namespace of the users that stand for SaladCloud organizations.
_TENANT_NAMESPACE = uuid.UUID("6b656c70-6965-5361-6c61-64436c6f7564")

#: A JWKS larger than this is refused.
_MAX_JWKS_BYTES = 1 << 20

#: A tenant's user, once seen to exist, is not looked up again for this long.
_USER_CACHE_SECONDS = 60.0

#: Validator answers are cached this long (seconds).
_VALIDATOR_CACHE_SECONDS = 60.0

#: The signature of an API-key validator: (api_key, organization, project) ->
#: the organization the key belongs to, or None.
Validator = Callable[[str, str, str], str | None]


class SaladAuthError(Exception):
    """
    A SaladCloud credential was refused (``status`` 403) or could not be
    checked now (``status`` 503).
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def tenant_user_id(organization: str) -> str:
    """
    The id of the user that stands for a SaladCloud organization.
    """
    return str(uuid.uuid5(_TENANT_NAMESPACE, f"salad-org:{organization}"))


def load_validator(spec: str) -> Validator:
    """
    Import an API-key validator named ``module:function``.

    Raises:
        ConfigError: It cannot be imported, or is not callable.
    """
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ConfigError(
            f"--salad-api-key-validator / KELPIE_SALAD_API_KEY_VALIDATOR must be "
            f"module:function, got {spec!r}"
        )
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load the API-key validator {spec!r}: {exc}") from exc
    if not callable(function):
        raise ConfigError(f"the API-key validator {spec!r} is not callable")
    validator: Validator = function
    return validator


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@attrs.frozen(kw_only=True)
class SaladAuthSettings:
    """
    Which SaladCloud credentials the server accepts.

    Attributes:
        jwks_url: Where the workload tokens' signing keys are published
            (``https://``; ``http://`` only on loopback); ``None``: workload
            tokens are refused.
        audience: The ``aud`` a token must carry; ``None``: not checked.
        organizations: The SaladCloud organizations whose credentials are
            accepted; required with ``jwks_url`` (SaladCloud signs the tokens
            of every customer's workloads).
        api_key_validator: ``module:function`` checking ``Salad-Api-Key``;
            ``None``: SaladCloud API keys are refused.
        jwks_timeout: Seconds to wait for the JWKS.
        jwks_ttl: Seconds a fetched JWKS is used before it is fetched again.
        min_refresh: Seconds between fetches for an unknown key id.
    """

    jwks_url: str | None = None
    audience: str | None = None
    organizations: frozenset[str] = frozenset()
    api_key_validator: str | None = None
    jwks_timeout: float = 5.0
    jwks_ttl: float = 3600.0
    min_refresh: float = 30.0

    @property
    def enabled(self) -> bool:
        """
        Whether any SaladCloud credential is accepted.
        """
        return self.jwks_url is not None or self.api_key_validator is not None

    def check(self) -> None:
        """
        Refuse an unusable combination.

        Raises:
            ConfigError: A JWKS URL that is not https (off loopback), or
                without allowed organizations.
        """
        if self.jwks_url is None:
            return
        parts = urlsplit(self.jwks_url)
        if parts.scheme not in ("https", "http") or not parts.hostname:
            raise ConfigError(
                f"--salad-jwks-url / KELPIE_SALAD_JWKS_URL must be an https URL, "
                f"got {self.jwks_url!r}"
            )
        if parts.scheme == "http" and not _loopback(parts.hostname):
            raise ConfigError(
                "--salad-jwks-url / KELPIE_SALAD_JWKS_URL must use https (http only "
                f"on loopback), got {self.jwks_url!r}"
            )
        if not self.organizations:
            raise ConfigError(
                "--salad-jwks-url needs --salad-allowed-orgs / "
                "KELPIE_SALAD_ALLOWED_ORGS: SaladCloud signs the workload tokens of "
                "every organization"
            )

    @classmethod
    def from_values(
        cls,
        *,
        jwks_url: str | None,
        audience: str | None,
        organizations: Iterable[str] | str | None,
        api_key_validator: str | None,
    ) -> SaladAuthSettings:
        """
        Settings from command-line values (``None`` for absent ones); the
        organizations may be one comma-separated string.
        """
        if isinstance(organizations, str):
            organizations = organizations.split(",")
        settings = cls(
            jwks_url=jwks_url or None,
            audience=audience or None,
            organizations=frozenset(
                o.strip() for o in organizations or () if o.strip()
            ),
            api_key_validator=api_key_validator or None,
        )
        settings.check()
        return settings


class JWKSCache:
    """
    The signing keys at a JWKS URL, fetched on demand and kept for ``ttl``
    seconds. Thread-safe.

    Args:
        url: The JWKS URL.
        timeout: Seconds to wait for it.
        ttl: Seconds a fetched set is used.
        min_refresh: Seconds between fetches caused by unknown key ids or
            failures.
        clock: Monotonic seconds (tests pass a fake one).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 5.0,
        ttl: float = 3600.0,
        min_refresh: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.ttl = ttl
        self.min_refresh = min_refresh
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str | None, jwt.PyJWK] | None = None
        self._expires = 0.0
        self._attempted: float | None = None
        #: Fetches made (successful or not), for tests and logs.
        self.fetches = 0

    def key(self, kid: str | None) -> jwt.PyJWK:
        """
        The key with this id (a token without ``kid`` needs a one-key set).

        Raises:
            SaladAuthError: 403 for an unknown key; 503 while no set could be
                fetched.
        """
        with self._lock:
            now = self._clock()
            if self._keys is None or now >= self._expires:
                self._refresh(now)
            found = self._find(kid)
            if found is None and self._may_fetch(now):
                self._refresh(now)
                found = self._find(kid)
            if found is not None:
                return found
            if self._keys is None:
                raise SaladAuthError(
                    503, "cannot fetch the SaladCloud signing keys; retry later"
                )
            raise SaladAuthError(403, "the token's signing key is unknown")

    def _may_fetch(self, now: float) -> bool:
        return self._attempted is None or now - self._attempted >= self.min_refresh

    def _find(self, kid: str | None) -> jwt.PyJWK | None:
        if self._keys is None:
            return None
        if kid is None:
            keys = list(self._keys.values())
            return keys[0] if len(keys) == 1 else None
        return self._keys.get(kid)

    def _refresh(self, now: float) -> None:
        if not self._may_fetch(now):
            return
        self._attempted = now
        self.fetches += 1
        try:
            keys = self._fetch()
        except (OSError, ValueError, jwt.PyJWKSetError, jwt.PyJWKError) as exc:
            logger.warning("salad auth: cannot fetch the JWKS at %s: %s", self.url, exc)
            # A stale set beats none; try again after min_refresh.
            self._expires = now + self.min_refresh
            return
        self._keys = keys
        self._expires = now + self.ttl

    def _fetch(self) -> dict[str | None, jwt.PyJWK]:
        request = urllib.request.Request(  # noqa: S310 - scheme checked in settings
            self.url, headers={"Accept": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
            body = response.read(_MAX_JWKS_BYTES + 1)
        if len(body) > _MAX_JWKS_BYTES:
            raise ValueError("the JWKS is larger than 1 MiB")
        data = json.loads(body)
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            raise ValueError("not a JWKS (no 'keys' list)")
        usable = [
            k
            for k in data["keys"]
            if isinstance(k, dict) and k.get("kty") in _ASYMMETRIC
        ]
        keys = jwt.PyJWKSet(usable).keys
        return {k.key_id: k for k in keys if k.algorithm_name in _ALGORITHMS}


class SaladAuth:
    """
    Turns SaladCloud credentials into principals (see the module docstring).

    Args:
        settings: What is accepted.
        clock: Monotonic seconds, for the caches.
    """

    def __init__(
        self,
        settings: SaladAuthSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        settings.check()
        self.settings = settings
        self._clock = clock
        self.jwks = (
            JWKSCache(
                settings.jwks_url,
                timeout=settings.jwks_timeout,
                ttl=settings.jwks_ttl,
                min_refresh=settings.min_refresh,
                clock=clock,
            )
            if settings.jwks_url
            else None
        )
        self.validator = (
            load_validator(settings.api_key_validator)
            if settings.api_key_validator
            else None
        )
        self._lock = threading.Lock()
        self._answers: dict[tuple[str, str, str], tuple[str | None, float]] = {}
        #: Tenants' users known to exist, until when (a deleted one comes back).
        self._users: dict[str, float] = {}

    def principal(
        self,
        store: Store,
        *,
        api_key: str | None,
        organization: str | None,
        project: str,
        authorization: str | None,
    ) -> Principal:
        """
        The principal behind a SaladCloud API key (tried first, as the
        original does) or workload token.

        Raises:
            SaladAuthError: Refused (403) or not checkable now (503).
        """
        if api_key:
            org = self._check_api_key(api_key, organization or "", project)
        else:
            org = self._check_token(authorization or "", project)
        if org not in self.settings.organizations and self.settings.organizations:
            raise SaladAuthError(
                403, f"the organization {org!r} may not use this server"
            )
        user_id = tenant_user_id(org)
        now = self._clock()
        if self._users.get(user_id, 0.0) <= now:
            store.ensure_user(user_id, org)
            with self._lock:
                if len(self._users) > 10_000:
                    self._users.clear()
                self._users[user_id] = now + _USER_CACHE_SECONDS
        return Principal(user_id, org, project)

    def forget_users(self) -> None:
        """
        Check again that each tenant's user exists (after ``DELETE /users``).
        """
        with self._lock:
            self._users.clear()

    def _check_token(self, authorization: str, project: str) -> str:
        if self.jwks is None:
            raise SaladAuthError(
                403,
                "SaladCloud workload tokens are not accepted by this server "
                "(see --salad-jwks-url); use X-Kelpie-Key",
            )
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise SaladAuthError(403, "expected Authorization: Bearer <token>")
        token = token.strip()
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise SaladAuthError(403, f"invalid token: {exc}") from exc
        kid = header.get("kid")
        key = self.jwks.key(kid if isinstance(kid, str) else None)
        audience = self.settings.audience
        try:
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=[key.algorithm_name],
                audience=audience,
                options={
                    "require": ["exp", ORG_CLAIM],
                    "verify_aud": audience is not None,
                },
                leeway=30,
            )
        except jwt.InvalidTokenError as exc:
            raise SaladAuthError(403, f"invalid token: {exc}") from exc
        org = claims[ORG_CLAIM]
        if not isinstance(org, str) or not org:
            raise SaladAuthError(403, f"invalid token: bad {ORG_CLAIM} claim")
        token_project = claims.get(PROJECT_CLAIM)
        if token_project is not None and token_project != project:
            raise SaladAuthError(
                403, "the token's project does not match the Salad-Project header"
            )
        return org

    def _check_api_key(self, api_key: str, organization: str, project: str) -> str:
        if self.validator is None:
            raise SaladAuthError(
                403,
                "SaladCloud API keys are not accepted by this server "
                "(see --salad-api-key-validator); use X-Kelpie-Key",
            )
        digest = hashlib.sha256(api_key.encode()).hexdigest()
        cache_key = (digest, organization, project)
        now = self._clock()
        with self._lock:
            cached = self._answers.get(cache_key)
        if cached is not None and cached[1] > now:
            org = cached[0]
        else:
            try:
                org = self.validator(api_key, organization, project)
            except Exception as exc:  # any failure of the operator's validator
                logger.warning("salad auth: the API-key validator failed: %r", exc)
                raise SaladAuthError(
                    503, "cannot check the SaladCloud API key now; retry later"
                ) from exc
            if org is not None and not isinstance(org, str):
                raise SaladAuthError(
                    503, "the API-key validator answered neither a name nor None"
                )
            with self._lock:
                if len(self._answers) > 10_000:
                    self._answers.clear()
                self._answers[cache_key] = (org, now + _VALIDATOR_CACHE_SECONDS)
        if not org:
            raise SaladAuthError(403, "Invalid API Key")
        return org


def add_salad_auth_arguments(
    parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None
) -> None:
    """
    Add the SaladCloud credential options (defaults from the environment).
    """
    env = os.environ if environ is None else environ
    group = parser.add_argument_group(
        "SaladCloud credentials",
        "Accept SaladCloud workload tokens and API keys as well as Kelpie API "
        "keys (off by default). Each caller's tenant is its organization.",
    )
    group.add_argument(
        "--salad-jwks-url",
        metavar="URL",
        default=env.get("KELPIE_SALAD_JWKS_URL"),
        help="verify workload tokens (Authorization: Bearer) with the keys at "
        "this JWKS URL (default: $KELPIE_SALAD_JWKS_URL; none: refused)",
    )
    group.add_argument(
        "--salad-jwt-audience",
        metavar="AUD",
        default=env.get("KELPIE_SALAD_JWT_AUDIENCE"),
        help="the audience a workload token must carry (default: "
        "$KELPIE_SALAD_JWT_AUDIENCE; none: not checked)",
    )
    group.add_argument(
        "--salad-allowed-orgs",
        metavar="ORG,...",
        default=env.get("KELPIE_SALAD_ALLOWED_ORGS"),
        help="the SaladCloud organizations allowed in; required with "
        "--salad-jwks-url (default: $KELPIE_SALAD_ALLOWED_ORGS)",
    )
    group.add_argument(
        "--salad-api-key-validator",
        metavar="MODULE:FUNCTION",
        default=env.get("KELPIE_SALAD_API_KEY_VALIDATOR"),
        help="check Salad-Api-Key with this function of (key, organization, "
        "project), which returns the key's organization or None (default: "
        "$KELPIE_SALAD_API_KEY_VALIDATOR; none: refused)",
    )


def salad_auth_settings(args: argparse.Namespace) -> SaladAuthSettings | None:
    """
    The settings from ``add_salad_auth_arguments``' options; ``None`` when off.

    Raises:
        ConfigError: An unusable combination, or a validator that cannot be
            loaded.
    """
    settings = SaladAuthSettings.from_values(
        jwks_url=args.salad_jwks_url,
        audience=args.salad_jwt_audience,
        organizations=args.salad_allowed_orgs,
        api_key_validator=args.salad_api_key_validator,
    )
    if not settings.enabled:
        return None
    if settings.api_key_validator:
        load_validator(settings.api_key_validator)  # fail at start-up
    return settings

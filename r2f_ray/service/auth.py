"""Bearer-token auth. Tokens come from a file or an environment variable; each has a name, and only
the name ever reaches logs, job records or the audit log."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

MIN_TOKEN_CHARS = 16


class AuthError(Exception):
    """Missing or wrong credentials (HTTP 401)."""


def _parse_pair(text: str, where: str) -> tuple[str, str]:
    for sep in (":", " ", "\t"):
        if sep in text:
            name, token = (part.strip() for part in text.split(sep, 1))
            break
    else:
        name, token = "", text.strip()
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"{where}: a token must be at least {MIN_TOKEN_CHARS} characters (e.g. `python -c \"import secrets; print(secrets.token_hex(16))\"`)")
    if not name:  # an unnamed token is named after a short hash, never after itself
        name = "token-" + hashlib.sha256(token.encode()).hexdigest()[:8]
    return name, token


class TokenAuth:
    """Maps a presented bearer token to the name of its holder."""

    def __init__(self, tokens: dict[str, str]):
        self._tokens = dict(tokens)  # name -> token

    @classmethod
    def from_sources(cls, tokens_file: str | Path | None, env_var: str | None) -> "TokenAuth":
        tokens: dict[str, str] = {}
        if tokens_file is not None:
            path = Path(tokens_file)
            if not path.is_file():
                raise ValueError(f"tokens file {path} does not exist; write one 'name token' per line")
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if line.strip() and not line.lstrip().startswith("#"):
                    name, token = _parse_pair(line, f"{path} line {i}")
                    tokens[name] = token
        if env_var and os.environ.get(env_var):
            for i, item in enumerate(os.environ[env_var].split(","), 1):
                if item.strip():
                    name, token = _parse_pair(item, f"${env_var} entry {i}")
                    tokens[name] = token
        return cls(tokens)

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def names(self) -> list[str]:
        return sorted(self._tokens)

    def authenticate(self, authorization: str | None) -> str:
        """The holder's name for an ``Authorization: Bearer <token>`` header; AuthError otherwise."""
        if not authorization:
            raise AuthError("missing Authorization header; send 'Authorization: Bearer <token>'")
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise AuthError("Authorization must be 'Bearer <token>'")
        presented_b = presented.strip().encode()
        holder = None
        for name, token in self._tokens.items():  # compare against every token: time does not reveal which
            if hmac.compare_digest(presented_b, token.encode()):
                holder = name
        if holder is None:
            raise AuthError("invalid token")
        return holder

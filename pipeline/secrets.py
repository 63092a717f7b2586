"""Keeping the API key out of everything the pipeline prints or stores.

The key only ever travels in the ``Authorization`` header, but a server may
echo that header (or the key) back in an error body, and from there it would
reach the ``error`` column, the journal and the terminal. :class:`Redactor`
is applied at one seam, :meth:`Redactor.for_headers`' ``response`` and
``message``, where every route's answer enters the pipeline: the realtime
client's chat replies and every batch route (submit, poll, results pages,
downloaded files). So completions, errors, stop lines and the journal never
see the key, whatever a server echoes; the CLI also masks what it prints.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from urllib.parse import quote

from pipeline.errors import CredentialsError

MASK = "***"
# Shorter "keys" (a loopback server's "test") are not masked: replacing every
# occurrence of a short word would corrupt completions. Real keys are 32+ characters.
MIN_SECRET_LENGTH = 8
# "Bearer <credential>" in any capitalisation: whatever follows is a credential,
# whether or not it is the job's key (a proxy may echo its own).
_BEARER = re.compile(r"(?i)\b(bearer)(\s+)[^\s\"',;}\]]+")


class Redactor:
    """Replaces a secret (and any ``Bearer <token>``) with ``***`` in text."""

    def __init__(self, *secrets: str | None) -> None:
        forms: set[str] = set()
        for secret in secrets:
            if secret and len(secret) >= MIN_SECRET_LENGTH:
                # The forms a server might echo it in: raw, JSON-escaped, URL-encoded (also
                # every byte percent-encoded, in either case). JSON \u escapes: see redact_bytes.
                every = "".join(f"%{b:02x}" for b in secret.encode())
                forms.update({secret, json.dumps(secret)[1:-1], quote(secret, safe=""), every, every.upper()})
        # Longest first, so a form that contains another is replaced whole.
        self._secrets = sorted(forms, key=len, reverse=True)
        self._secret_bytes = [s.encode("utf-8", "replace") for s in self._secrets]

    @classmethod
    def for_headers(cls, headers: Mapping[str, str]) -> Redactor:
        """A redactor for every credential a request carries: the bearer key, and headers named like keys."""
        secrets: list[str | None] = []
        for name, value in headers.items():
            lower = name.lower()
            if lower == "authorization":
                scheme, _, credential = value.partition(" ")
                secrets.append(credential.strip() if scheme.lower() == "bearer" else value)
            elif any(word in lower for word in ("key", "token", "secret")):
                secrets.append(value)
        return cls(*secrets)

    def response(self, raw: bytes) -> bytes:
        """A route's raw answer, the key masked, before anything parses it (see :meth:`redact_bytes`)."""
        return self.redact_bytes(raw) if self._secret_bytes else raw

    def message(self, text: str | None) -> str | None:
        """An error or stop text built from a route's answer, masked (see :meth:`redact`)."""
        return None if text is None else self.redact(text)

    @classmethod
    def for_authorization(cls, header: str | None) -> Redactor:
        """A redactor for the key inside an ``Authorization: Bearer <key>`` header value."""
        if not header:
            return cls()
        scheme, _, credential = header.partition(" ")
        return cls(credential.strip() if scheme.lower() == "bearer" else header)

    def redact(self, text: str) -> str:
        """``text`` with every form of the secret and every bearer token masked."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return _BEARER.sub(rf"\1\2{MASK}", text)

    def redact_bytes(self, raw: bytes) -> bytes:
        """A response body with the secret masked (cheap: a substring search when absent).

        Bearer tokens are left alone here: a completion may legitimately talk
        about them, while the key itself never belongs in one.
        """
        for secret in self._secret_bytes:
            if secret in raw:
                raw = raw.replace(secret, MASK.encode())
        if b"\\u00" in raw:
            # JSON may write any character as \uXXXX ("sk\u002dor..."): the parsed text would
            # hold the key although the bytes do not. Spell printable ASCII out, then look again.
            plain = _ASCII_ESCAPE.sub(_unescape, raw)
            if any(secret in plain for secret in self._secret_bytes):
                return self.redact_bytes(plain)
        return raw


# A JSON \u escape of printable ASCII, not itself escaped (an even run of backslashes before it).
_ASCII_ESCAPE = re.compile(rb"(?<!\\)((?:\\\\)*)\\u00([2-7][0-9a-fA-F])")


def _unescape(found: re.Match[bytes]) -> bytes:
    char = int(found[2], 16)
    if char in (0x22, 0x5C, 0x7F):  # a quote or a backslash stays escaped: the JSON stays valid
        return found[0]
    return found[1] + bytes([char])


# An environment variable name as shells write it.
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# What a key may hold to travel in an HTTP header: visible ASCII, no spaces.
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")
_KEY_PREFIXES = ("sk-", "sk_", "or-", "pk-", "key-", "bearer ")


def looks_like_key(value: str) -> bool:
    """True when ``value`` (meant to be a variable's name) looks like a key instead.

    Such a value must never be echoed: ``api_key_env = "sk-or-v1-..."`` puts the
    key itself where the name of the variable holding it belongs.
    """
    if not _ENV_NAME.fullmatch(value):
        return True
    if value.lower().startswith(_KEY_PREFIXES):
        return True
    # Keys are long runs of mixed-case letters and digits; names are words.
    mixed = any(c.islower() for c in value) and any(c.isupper() for c in value) and any(c.isdigit() for c in value)
    return len(value) >= 20 and mixed


def key_from_environment(env: str) -> str:
    """The key held by environment variable ``env``; a one-line CredentialsError if unusable.

    No message ever quotes the key, nor ``env`` when it looks like a key itself.
    """
    if looks_like_key(env):
        raise CredentialsError(
            "[model] api_key_env should name an environment variable, not hold the key: export the key "
            '(e.g. export OPENROUTER_API_KEY=...) and set api_key_env = "OPENROUTER_API_KEY"'
        )
    key = os.environ.get(env, "").strip()
    if not key:
        raise CredentialsError(
            f"[model] api_key_env: environment variable {env} is not set; export your API key "
            'there (or set api_key_env = "" for a server that needs none; --dry-run needs no key)'
        )
    if not _HEADER_SAFE.fullmatch(key):
        raise CredentialsError(
            f"environment variable {env} holds a key with a line break, space, control or non-ASCII "
            "character, which cannot be sent in an HTTP header; export the key alone"
        )
    return key

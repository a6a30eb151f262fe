"""Keep secrets (the Girder API key, SASL and SSL passwords) out of every text the
program writes: log lines, registry rows, artifacts, exception messages.

Error texts of libraries repeat what they were given: requests puts the URL, query
string included, in its connection errors; configparser quotes the line it could not
parse. Every such text goes through :func:`redact` before it becomes one of our
messages, with the secrets the caller knows. Query parameters that carry credentials
(``key=``, ``token=``, ``password=``...) and the password of a URL's user information
(``http://user:password@host/api/v1``, a proxy's, a broker's ``SASL_SSL://u:p@host``)
are masked even when their value is unknown.
Pure standard library: no Prefect, Kafka or Girder import.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

__all__ = ["MASK", "redact", "redact_unknown", "is_secret_option"]

MASK = "***"

#: ``name=value`` in a URL query or a form body, for names that carry credentials.
_CREDENTIAL_PARAM = re.compile(
    r"(?P<name>\b(?:key|apikey|api_key|token|password|passwd|secret)=)(?P<value>[^&\s'\"<>)]+)",
    re.IGNORECASE)
#: ``scheme://user:password@``: the password of a URL's user information.
_URL_PASSWORD = re.compile(
    r"(?P<head>\b[A-Za-z][A-Za-z0-9_+.\-]*://[^\s:/@'\"<>]*:)(?P<password>[^\s/@'\"<>]*)@")
#: librdkafka options whose value is a secret (the rest are safe to show).
_SECRET_WORDS = ("password", "secret")
_SECRET_OPTIONS = frozenset({"ssl.key.pem", "sasl.oauthbearer.config", "ssl_key"})


def redact(text: object, secrets: Iterable[str | None] = ()) -> str:
    """``text`` as a string with every secret masked: each of ``secrets`` (as given and
    URL-encoded), and the value of every credential-looking query parameter."""
    result = str(text)
    # Longest first, so that a secret containing another is masked whole.
    known = sorted({s for s in secrets if s}, key=len, reverse=True)
    for secret in known:
        for form in dict.fromkeys((secret, quote(secret, safe=""), quote_plus(secret))):
            result = result.replace(form, MASK)
    return redact_unknown(result)


def redact_unknown(text: str) -> str:
    """``text`` with the secrets that show by their place masked: credential query
    parameters and URL passwords (no secret value needed)."""
    text = _URL_PASSWORD.sub(lambda m: m.group("head") + MASK + "@", text)
    return _CREDENTIAL_PARAM.sub(lambda m: m.group("name") + MASK, text)


def is_secret_option(option: str) -> bool:
    """True for a config option whose value must never be shown (``sasl.password``,
    ``ssl.key.password``, ``sasl.oauthbearer.client.secret``, ``ssl.key.pem``...)."""
    name = option.strip().lower()
    return name in _SECRET_OPTIONS or any(word in name for word in _SECRET_WORDS)

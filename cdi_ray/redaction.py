"""Secrets never travel: URLs that carry credentials, and values echoed back in messages.

Credentials come only from the environment (docs/ROBUSTNESS.md, "Security and privacy"). A URL
can still smuggle one in — user-info (``https://user:pass@host/…``, ``s3://KEY:SECRET@bucket``)
or a signed query (``?X-Amz-Signature=…``, an Azure SAS ``sig=…``, a GCS ``X-Goog-Signature``).
:func:`carries_credentials` finds them anywhere in a string; :func:`redact` replaces the secret
parts with ``***`` so that what is echoed in a message or written to an output never holds them;
:func:`shown` is how a message quotes a value: redacted and cut to :data:`ECHO_LIMIT` characters.
This module imports no Ray.
"""
from __future__ import annotations

import re

#: Most characters of a value quoted in a message (a 1 MB string is not echoed back whole).
ECHO_LIMIT = 200

_USERINFO_END = re.compile(r"[/?#@\s]")
#: Query parameters that carry a signature, a credential or a token (case-insensitive).
_SIGNED_PARAM = re.compile(
    r"(?P<key>(?:^|[?&;])(?:x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|"
    r"x-goog-credential|signature|sig|awsaccesskeyid|access_token|token|code|key|api_key|apikey|"
    r"client_secret|password|sas)=)(?P<value>[^&#;\s]*)",
    re.I | re.M)


def _userinfo_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of the user-info of every URL in ``text`` (what sits between ``://`` and
    ``@``). Found from each ``://`` forwards — linear in the text, with no regex that could
    backtrack over a long value."""
    spans, i = [], text.find("://")
    while i >= 0:
        start = i + 3
        m = _USERINFO_END.search(text, start)
        if m is not None and m.group() == "@" and m.start() > start:
            spans.append((start, m.start()))
        i = text.find("://", start)
    return spans


def carries_credentials(text: str) -> bool:
    """True if ``text`` holds a URL with user-info, or a signed / token query parameter."""
    text = str(text)
    if "://" in text and _userinfo_spans(text):
        return True
    return "=" in text and any(m.group("value") for m in _SIGNED_PARAM.finditer(_queries(text)))


def _queries(text: str) -> str:
    """The query parts of the URLs in ``text`` (what follows a '?'), one a line."""
    return "\n".join(part.split("#", 1)[0] for part in re.findall(r"\?([^\s'\"]*)", text))


def redact(text: str) -> str:
    """``text`` with URL user-info and signed query values replaced by ``***``."""
    text = str(text)
    for start, end in reversed(_userinfo_spans(text)):
        text = text[:start] + "***" + text[end:]
    if "?" not in text:
        return text

    def query(m: re.Match) -> str:
        return "?" + _SIGNED_PARAM.sub(lambda p: p.group("key") + "***", m.group(1))

    return re.sub(r"\?([^\s'\"#]*)", query, text)


def shorten(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


def shown(value) -> str:
    """How a message quotes a value: its ``repr``, redacted, at most :data:`ECHO_LIMIT` characters."""
    text = repr(value)
    if len(text) <= ECHO_LIMIT:
        return redact(text)
    return f"{redact(text[: 4 * ECHO_LIMIT])[:ECHO_LIMIT]}… ({len(text):,} characters)"  # redacts a bounded piece

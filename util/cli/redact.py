"""Secrets in checkpoint URLs kept out of what the tool prints and writes: a presigned URL's signature or
token (``?X-Amz-Signature=...``, ``?token=...``) and a password (``https://user:password@host/...``) are
credentials that a log, a shared error line or a shared checkpoint would hand on. ``redacted`` is applied
where output is formatted (the log handler, the error line, the waiting ranks' notices), so that every
message may name a URL as it is; the program itself always uses the real URL (the download, the cache
path, which hashes it)."""

import argparse
import re
from typing import Any

HIDDEN = "***"
# An http(s) URL inside a line: up to a space, a quote (a repr or JSON of the flags) or an angle bracket.
_URL = re.compile(r"https?://[^\s'\"<>]+", re.IGNORECASE)
# A value that is a URL and nothing else (a flag's): all of it is the URL, a quote in it included.
_WHOLE_URL = re.compile(r"https?://\S+", re.IGNORECASE)
# What a sentence puts right after a URL ("--finetune URL: ...", "(... URL)"), not part of it.
_TRAILING = ".,;:)]"


def shown_url(url: str) -> str:
    """``url`` with its secrets replaced by ``***``: the password of its user information (the whole of it
    where it has no password: ``https://TOKEN@host`` is a common form of a token), every value of its query
    (the names stay: ``X-Amz-Signature=***`` says what was there) and its fragment. The host and the path,
    which tell the user which file it is, stay as they are."""
    start, userinfo, rest = split_userinfo(url)
    if userinfo is not None:
        user, colon, _ = userinfo.partition(":")
        start += f"{user}:{HIDDEN}@" if colon else f"{HIDDEN}@"
    rest, hash_sign, fragment = rest.partition("#")
    rest, question_mark, query = rest.partition("?")
    if query:
        query = "&".join(_hidden_value(item) for item in query.split("&"))
    return f"{start}{rest}{question_mark}{query}{hash_sign}{HIDDEN if fragment else ''}"


def split_userinfo(url: str) -> tuple[str, str | None, str]:
    """``url`` as its ``scheme://``, its user information (None where it has none) and the rest (host, path,
    query, fragment). The user information ends at the last ``@`` before the first ``/``, ``?`` or ``#``, as
    urllib reads it; or, where what precedes that first one has a port that is not a number, at the URL's last
    ``@``: a password typed with one of those characters unencoded (``https://me:a/b@host/w.pth``, as AWS
    secret keys hold ``/``), which urllib reads as host ``me`` at port ``a``, and which must not be shown."""
    scheme, separator, rest = url.partition("://")
    authority = re.split(r"[/?#]", rest, maxsplit=1)[0]
    if "@" in authority:
        userinfo = authority.rsplit("@", 1)[0]
        return f"{scheme}{separator}", userinfo, rest[len(userinfo) + 1 :]
    port = authority.rpartition("]")[2]  # after an IPv6 address's brackets
    if ":" in port and not port.rpartition(":")[2].isdigit() and "@" in rest:
        userinfo, rest = rest.rsplit("@", 1)
        return f"{scheme}{separator}", userinfo, rest
    return f"{scheme}{separator}", None, rest


def _hidden_value(item: str) -> str:
    """``name=***`` for ``name=value``; an item without a name (``?SECRET``) is hidden whole."""
    if not item:
        return item
    name, equals, _ = item.partition("=")
    return f"{name}={HIDDEN}" if equals else HIDDEN


def redacted(text: str) -> str:
    """``text`` with every http(s) URL in it as ``shown_url`` writes it."""
    return _URL.sub(_shown_match, text) if "://" in text else text


def _shown_match(match: re.Match) -> str:
    url = match.group()
    stripped = url.rstrip(_TRAILING)
    return shown_url(stripped) + url[len(stripped) :]


def values_without_secrets(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with their URLs' secrets hidden, before they are written as JSON (knn_eval's records,
    export's metadata): redacting the JSON text instead cut an escaped quote's backslash off and left
    invalid JSON. A value that is one URL is shown whole by ``shown_url``; text holding URLs by ``redacted``."""
    return {name: _without_secrets(value) for name, value in values.items()}


def _without_secrets(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    return shown_url(value) if _WHOLE_URL.fullmatch(value) else redacted(value)


def args_without_secrets(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of ``args`` whose text values have their URLs' secrets hidden: the flags a checkpoint stores
    (``--finetune URL``, ``--resume URL``), which record where a run came from and are never used to
    download again, travel with the checkpoint to whoever it is shared with."""
    return argparse.Namespace(**values_without_secrets(vars(args)))

"""Text that is safe to show: URLs and commands with their credentials masked, untrusted names in one line."""

from __future__ import annotations

import re

USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s]*)(?P<password>:[^/@\s]*)?@")
_QUERY_VALUE = re.compile(r"(?P<name>[?&][^=&#\s]+)=[^&#\s'\"]*")
_SECRET_ASSIGNMENT = re.compile(r"(?P<name>\b\w*(?:SECRET|TOKEN|PASSWORD|PASSWD|KEY)\w*=)[^\s&;'\"]+", re.IGNORECASE)
_AUTH_HEADER = re.compile(r"(?P<name>Authorization:\s*\w+\s+)[^\s'\"]+", re.IGNORECASE)
_USER_OPTION = re.compile(r"(?P<name>(?:^|\s)(?:-u|--user)\s+)[^\s'\"]+")  # curl/wget style user:password


def redact(text: str) -> str:
    """`text` with every credential-shaped part of the URLs (and pipe: commands) in it masked:
    passwords in user:password@, query values (tokens, presigned signatures), KEY=/TOKEN=/SECRET=
    assignments, Authorization headers and -u/--user options."""
    # A user name alone (https://TOKEN@host) is often the secret itself.
    text = USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@" if m["password"] else f"{m['scheme']}***@", text)
    text = _QUERY_VALUE.sub(lambda m: f"{m['name']}=***", text)
    text = _SECRET_ASSIGNMENT.sub(lambda m: f"{m['name']}***", text)
    text = _AUTH_HEADER.sub(lambda m: f"{m['name']}***", text)
    return _USER_OPTION.sub(lambda m: f"{m['name']}***", text)


def printable(text: str) -> str:
    """`text` with its control characters (newlines, terminal escapes) escaped, as Python writes them:
    untrusted text (a key from a shard, a name from a file) shown in one line that cannot restyle a terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)

"""Values sent by strangers, as a message may echo them back.

Messages name the value that was refused, but never all of a huge one, never as markup
a browser would render, and never with characters that cannot be encoded (a lone
surrogate sent through JSON): one short ASCII quote of it.
"""

from __future__ import annotations


def shown(value, limit: int = 40) -> str:
    """A value a stranger sent, as a message may echo it: quoted, at most `limit`
    characters, plain ASCII (no markup, no lone surrogates), never the whole of a huge value."""
    if isinstance(value, str):
        text = ascii(value[:limit + 1])
    elif value is None or isinstance(value, (bool, int, float)):
        text = ascii(value)
    else:
        return f"a {type(value).__name__}"
    text = text.replace("<", "\\x3c").replace(">", "\\x3e").replace("&", "\\x26")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def is_text(value) -> bool:
    """Whether a str is text that can be encoded (no lone surrogates sent through JSON)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True

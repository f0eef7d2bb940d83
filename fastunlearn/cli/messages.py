"""Error messages in the command's own words: the Python names of options replaced by their flags."""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["to_flags"]


def to_flags(message: str, flags: Mapping[str, str]) -> str:
    """``message`` with the Python names of ``flags`` replaced by their flags.

    ``name=True`` becomes ``--flag``, and so does ``name=False`` when the flag is the ``--no-...`` switch
    of an option that defaults to True; ``name=value`` becomes ``--flag value``; a bare name is replaced
    only when it holds an underscore (``learning_rate``), so that words like "resume" in prose stay.
    Names inside paths or quotes are left alone.
    """

    def replace(match: re.Match) -> str:
        name, value = match.group(1), match.group(2)
        flag = flags.get(name)
        if flag is None or (value is None and "_" not in name):
            return match.group(0)
        if value is None or value == "=True" or (value == "=False" and flag.startswith("--no-")):
            return flag
        return f"{flag} {value[1:]}"

    return re.sub(r"(?<![\w/.\-'\"])([a-z][a-z0-9_]*)(=[^\s,;)]+)?", replace, message)

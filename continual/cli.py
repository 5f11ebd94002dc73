"""Command-line helpers: ``--flags`` accepted anywhere, also after the ``KEY VALUE`` overrides."""
import argparse
from typing import List, Optional, Sequence

__all__ = ["move_flags_first"]


def move_flags_first(parser: argparse.ArgumentParser, argv: Sequence[str]) -> List[str]:
    """``argv`` with the parser's own options (and their values) moved before the first
    positional token, so that ``KEY VALUE ... --resume`` parses like ``--resume KEY VALUE ...``
    (argparse's ``REMAINDER`` would otherwise swallow them as overrides).

    A token counts as an option when it (or its part before ``=``) is one of the parser's option
    strings; config values never start with ``--``.
    """
    options = parser._option_string_actions
    flags: List[str] = []
    rest: List[str] = []
    tokens = list(argv)
    i = 0
    while i < len(tokens):
        token = tokens[i]
        name = token.split("=", 1)[0]
        action: Optional[argparse.Action] = options.get(name) if token.startswith("--") else None
        if action is None:
            rest.append(token)
            i += 1
            continue
        flags.append(token)
        i += 1
        takes_value = action.nargs != 0 and "=" not in token
        if takes_value and i < len(tokens):
            flags.append(tokens[i])
            i += 1
    return flags + rest

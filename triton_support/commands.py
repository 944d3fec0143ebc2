"""A talker request, decoded in one place: a synthesis request, or one typed control command
(``tts_contract.commands``). A control request with an unknown kind or version is refused, never guessed at."""
from __future__ import annotations

from typing import Optional

from tts_contract import commands, tensors as names
from tts_engine.errors import InvalidRequest

from .tensors import read_bytes


def read_command(pb_utils, request) -> Optional[commands.Command]:
    """The request's control command, or None for a synthesis request (it has no `command`). Raises
    InvalidRequest saying what is wrong with a bad one."""
    message = read_bytes(pb_utils, request, names.COMMAND)
    if message is None:
        return None
    try:
        return commands.decode(message, read_bytes(pb_utils, request, names.TEXT) or b"")
    except commands.CommandError as exc:
        raise InvalidRequest(str(exc)) from None

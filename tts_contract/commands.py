"""The talker's control commands: one typed, versioned message per control request, so a new command is a new
kind here, not one more optional tensor.

A control request to the `talker` model carries the `command` tensor (BYTES [1]): a JSON object with ``version``,
``kind`` and that kind's fields. An `append` carries its text in the request's `text` tensor as raw UTF-8 bytes
(split anywhere, even inside a character). Each control request is answered by one final response: no outputs
(`status`: the `status` output), or an error naming what was wrong. An unknown kind or version is refused.

| kind     | fields                       | effect                                                              |
|----------|------------------------------|---------------------------------------------------------------------|
| `cancel` | `stream_id` or `stream_key`  | stop that stream now (it ends like any cancelled stream, waiting or |
|          |                              | running)                                                            |
| `append` | `text_key`                   | the `text` tensor continues the text opened with that key          |
| `flush`  | `text_key`                   | the text so far is final as written (its held-back last word is     |
|          |                              | committed now)                                                      |
| `end`    | `text_key`                   | the text is complete                                                |
| `status` |                              | the talker's capacity now, as JSON in the `status` output           |

A stream is named by the talker's ``stream_id`` (in its `codes` responses: what the codec decoder knows), or by
the ``stream_key`` its client chose (the request parameter below): a client of the `tts` ensemble never sees the
stream id, and Triton 2.51 does not pass the cancellation of an ensemble request on to the talker, so a client
that gives up on a stream cancels it by its key.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Optional, Union

VERSION = 1
MAX_ID = 2**64 - 1
STREAM_KEY = "stream_key"  # request parameter: the client's name for a synthesis stream (unique among its streams)


class CommandError(ValueError):
    """A control message that is not a command of this version."""


@dataclass(frozen=True)
class Cancel:
    kind = "cancel"
    stream_id: Optional[int] = None
    stream_key: Optional[int] = None


@dataclass(frozen=True)
class Append:
    kind = "append"
    text_key: int
    text: bytes = b""  # travels in the `text` tensor, not in the message


@dataclass(frozen=True)
class Flush:
    kind = "flush"
    text_key: int


@dataclass(frozen=True)
class End:
    kind = "end"
    text_key: int


@dataclass(frozen=True)
class Status:
    kind = "status"


Command = Union[Cancel, Append, Flush, End, Status]
KINDS = {kind.kind: kind for kind in (Cancel, Append, Flush, End, Status)}
_IN_TENSORS = {"text"}  # fields that travel beside the message


def encode(command: Command) -> bytes:
    """The message of ``command`` (an Append's text goes in the `text` tensor)."""
    body = {"version": VERSION, "kind": command.kind}
    body.update({f.name: getattr(command, f.name) for f in fields(command)
                 if f.name not in _IN_TENSORS and getattr(command, f.name) is not None})
    return json.dumps(body, separators=(",", ":")).encode()


def decode(message: bytes, text: bytes = b"") -> Command:
    """The command in ``message`` (``text``: the request's `text` tensor, for an append); CommandError says what is
    wrong with anything else."""
    try:
        body = json.loads(message)
    except (ValueError, UnicodeDecodeError):
        raise CommandError("the command is not a JSON object") from None
    if not isinstance(body, dict):
        raise CommandError("the command is not a JSON object")
    if body.get("version") != VERSION:
        raise CommandError(f"command version {body.get('version')!r} is not supported; this talker speaks version "
                           f"{VERSION}")
    kind = KINDS.get(body.get("kind"))
    if kind is None:
        raise CommandError(f"unknown command kind {body.get('kind')!r}; known: {', '.join(KINDS)}")
    values = {}
    for item in fields(kind):
        value = body.get(item.name)
        if item.name in _IN_TENSORS or (value is None and item.default is None):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID:
            raise CommandError(f"command '{kind.kind}' needs '{item.name}', an integer within 0..2**64-1")
        values[item.name] = value
    if kind is Cancel and len(values) != 1:
        raise CommandError("command 'cancel' needs one of 'stream_id' and 'stream_key'")
    if kind is Append:
        values["text"] = text
    return kind(**values)

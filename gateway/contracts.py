"""Conversations: the sessions that started with the same ``contractId`` for the same authenticated subject. An
interrupt (``POST /api/v1/contracts/{contractId}/interrupt``, or the WebSocket message ``interrupt``) stops what
plays in each of them, on this replica at once and on the others through the interrupt bus."""
from __future__ import annotations

import asyncio
import logging
import time
import uuid

from starlette.requests import Request
from starlette.responses import JSONResponse

from . import metrics
from .auth import ANONYMOUS

log = logging.getLogger("gateway.contracts")
# An interrupt's answer waits this long for the sessions to end (each waits for its client's socket and for the
# aligner's heard text); a session that takes longer still ends, after the answer.
DELIVERY_WAIT_S = 2.0


def contract_problem(contract_id: object, limit: int) -> "str | None":
    """Why ``contract_id`` cannot name a conversation, or None."""
    if not isinstance(contract_id, str) or not contract_id.strip():
        return "contractId must be a non-empty string"
    if len(contract_id) > limit:
        return f"contractId has {len(contract_id)} characters; the limit is {limit}"
    if any(ord(c) < 32 or c == "/" for c in contract_id):
        return "contractId must not contain control characters or '/' (it is a path segment of the interrupt route)"
    return None


class Conversations:
    """This replica's sessions by (subject, contractId), and interrupts delivered to them (see the module)."""

    def __init__(self, bus):
        self.bus = bus
        self.replica = uuid.uuid4().hex[:12]  # this replica's own messages come back on the bus: skipped
        self._sessions: dict[tuple[str, str], set] = {}
        self._delivering: set = set()  # session interrupts still running after their answer went

    async def start(self) -> None:
        await self.bus.start(self._from_bus)

    async def close(self) -> None:
        await self.bus.close()

    def join(self, subject: str, contract_id: str, connection) -> None:
        self._sessions.setdefault((subject, contract_id), set()).add(connection)

    def leave(self, subject: str, contract_id: str, connection) -> None:
        sessions = self._sessions.get((subject, contract_id))
        if sessions is not None:
            sessions.discard(connection)
            if not sessions:
                del self._sessions[(subject, contract_id)]

    def sessions(self, subject: str, contract_id: str) -> int:
        return len(self._sessions.get((subject, contract_id), ()))

    async def interrupt(self, subject: str, contract_id: str) -> dict:
        """Stop what plays in every session of the conversation: this replica's now, the others' through the bus.
        Returns what happened here and whether the other replicas were told."""
        started = time.monotonic()
        published = asyncio.create_task(self.bus.publish({"origin": self.replica, "subject": subject,
                                                          "contractId": contract_id}))
        sessions, utterances = await self._deliver(subject, contract_id)
        reached_all = await published
        metrics.INTERRUPTS.labels("all_replicas" if reached_all else "this_replica").inc()
        log.info("interrupt of contract %r (subject %s): %d utterances in %d sessions here, %s, %.0f ms",
                 contract_id, subject, utterances, sessions,
                 "other replicas told" if reached_all else "other replicas NOT told (bus down)",
                 1000 * (time.monotonic() - started))
        return {"contractId": contract_id, "sessions": sessions, "utterances": utterances,
                "otherReplicas": "told" if reached_all else "not told: the interrupt bus is down",
                "bus": self.bus.kind}

    async def _from_bus(self, message: dict) -> None:
        if message.get("origin") == self.replica:
            return
        subject, contract_id = message.get("subject"), message.get("contractId")
        if isinstance(subject, str) and isinstance(contract_id, str):
            sessions, utterances = await self._deliver(subject, contract_id)
            if sessions:
                log.info("interrupt of contract %r from replica %s: %d utterances in %d sessions here", contract_id,
                         message.get("origin"), utterances, sessions)

    async def _deliver(self, subject: str, contract_id: str) -> tuple[int, int]:
        """Interrupt this replica's sessions of the conversation, waiting for them at most DELIVERY_WAIT_S (a
        client that does not read must not hold up the others); (sessions, utterances ended by then)."""
        connections = list(self._sessions.get((subject, contract_id), ()))
        tasks = [asyncio.create_task(c.interrupt()) for c in connections]
        if not tasks:
            return 0, 0
        done, pending = await asyncio.wait(tasks, timeout=DELIVERY_WAIT_S)
        for task in pending:
            self._delivering.add(task)
            task.add_done_callback(self._delivering.discard)
        ended = 0
        for task in done:
            if task.exception() is not None:
                log.warning("interrupting a session failed: %r", task.exception())
            else:
                ended += task.result()
        return len(connections), ended


async def interrupt_route(request: Request):
    """``POST /api/v1/contracts/{contractId}/interrupt``: the caller's own conversation (its token's subject)."""
    services = request.app.state.services
    contract_id = request.path_params["contract_id"]
    problem = contract_problem(contract_id, services.settings.max_contract_id_chars)
    if problem:
        return JSONResponse({"error": problem}, status_code=400)
    identity = request.scope.get("state", {}).get("identity", ANONYMOUS)
    return JSONResponse(await services.conversations.interrupt(identity.subject, contract_id))

"""Celery remote control on maas-worker nodes: read-only unless an operator opens it.

Celery obeys every command published on the broker's remote-control channel, so a
Redis writer (or a Flower login) could stop or throttle the fleet, or make it consume a
queue nobody checks (docs/security.md, "Remote control"). Here the worker's pidbox node
is a `GatedNode`, which answers:

* the read-only commands Flower and ``celery inspect`` need
  (`INSPECT_COMMANDS`), always;
* the operator's commands (everything else Celery knows: shutdown, pool
  size and restart, autoscale, rate and time limits, queue consumers,
  events off, memory dumps), only where ``MAAS_REMOTE_CONTROL=operator``;
* never: ``revoke``, ``terminate`` and ``revoke_by_stamped_headers`` (they
  drop a job without telling its client: ``maas-worker cancel`` is signed by
  the job's tenant and reported), and ``add_consumer`` of a queue that is not
  configured (transport.py does not consume one either). Revoked ids that
  Celery's start-up sync (``hello``) would merge from other nodes are
  refused too.

A refused command gets an error reply (``{"error": ...}``, which ``celery
inspect``/``control`` and Flower print) and one audit record ``policy``
naming the command; the worker carries on. Flower's control buttons follow
the same setting (`lock_flower`). The ACL roles of docs/security.md keep
producers from publishing on the channel at all.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection
from typing import Any

from kombu.pidbox import Node

from maas_worker.backend.keyspace import JOB_ID_RE
from maas_worker.protocol import AuditReason

log = logging.getLogger(__name__)

#: Read-only commands (and Celery's own bookkeeping between workers: ``hello``
#: at start-up, ``heartbeat``, ``enable_events``, which Flower sends and which
#: only turns on what is already on).
INSPECT_COMMANDS: frozenset[str] = frozenset(
    {
        "ping",
        "stats",
        "active",
        "dump_active",
        "reserved",
        "dump_reserved",
        "scheduled",
        "dump_schedule",
        "registered",
        "dump_tasks",
        "active_queues",
        "conf",
        "dump_conf",
        "revoked",
        "dump_revoked",
        "query_task",
        "clock",
        "report",
        "hello",
        "heartbeat",
        "enable_events",
    }
)
#: Refused whatever the setting (see the module docstring).
NEVER_COMMANDS: frozenset[str] = frozenset({"revoke", "terminate", "revoke_by_stamped_headers"})
#: MAAS_REMOTE_CONTROL value that lets the operator's commands through.
OPERATOR_MODE = "operator"

REVOKE_REFUSED = (
    "revoke is disabled on maas-worker nodes (it would drop jobs silently): "
    "cancel a job with `maas-worker cancel JOB_ID`, signed by its tenant"
)
OPERATOR_REFUSED = (
    "remote control command {command!r} is disabled on maas-worker nodes: "
    "only inspect commands are answered (an operator can allow it with "
    "MAAS_REMOTE_CONTROL=operator on the workers)"
)
QUEUE_REFUSED = "queue {queue!r} is not one of this deployment's queues: it is never consumed"

#: Flower's control buttons and their inputs (worker and task pages), hidden
#: when the endpoints behind them refuse.
_HIDE_CONTROLS = (
    b"<style>#worker-shutdown,#worker-pool-restart,#worker-pool-grow,#worker-pool-shrink,"
    b"#worker-pool-autoscale,#pool-size,#min-autoscale,#max-autoscale,#worker-add-consumer,"
    b"#add-consumer-name,[id^=worker-cancel-consumer-],#limits-table button,"
    b"#limits-table input,#task-terminate,#task-revoke{display:none!important}</style>"
)

_PRINTABLE = re.compile(r"[^\x21-\x7e]")


def _shown(value: object) -> str:
    """A command or queue name as it may appear in a reply, log or audit record."""
    return _PRINTABLE.sub("?", str(value))[:64]


def _single_task_id(arguments: dict[str, Any]) -> str:
    """The job a refused revoke named, if it named exactly one (for the audit record)."""
    ids = arguments.get("task_id")
    if isinstance(ids, list | tuple) and len(ids) == 1:
        ids = ids[0]
    return ids if isinstance(ids, str) and JOB_ID_RE.fullmatch(ids) else ""


def refusal(
    command: str, arguments: dict[str, Any], *, mode: str, queues: Collection[str]
) -> str | None:
    """Why ``command`` is refused on a worker in ``mode``; None if it may run.

    ``queues`` are the configured queue names (the only ones ``add_consumer``
    may name).
    """
    if command in INSPECT_COMMANDS:
        return None
    if command in NEVER_COMMANDS:
        return REVOKE_REFUSED
    if mode != OPERATOR_MODE:
        return OPERATOR_REFUSED.format(command=_shown(command))
    if command == "add_consumer" and arguments.get("queue") not in queues:
        return QUEUE_REFUSED.format(queue=_shown(arguments.get("queue")))
    return None


class GatedNode(Node):
    """kombu's pidbox node with `refusal` in front of every command.

    Configure with `configure` before the worker starts its consumer; the
    class attributes hold the settings because kombu builds the node itself.
    """

    mode: str = "inspect"
    queues: frozenset[str] = frozenset()

    def handle(self, method: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run ``method`` if allowed; else one audit record and an error reply."""
        why = refusal(method, arguments or {}, mode=self.mode, queues=self.queues)
        if why is None:
            return super().handle(method, arguments)  # type: ignore[no-untyped-call]
        from maas_worker.broker import (
            transport,  # the main process's auditor (no new client per command)
        )

        shown = _shown(method)
        log.warning("refused remote control command %s", shown)
        transport.auditor.record(
            None,
            AuditReason.POLICY,
            job_id=_single_task_id(arguments or {}),
            detail=f"remote {shown} refused",
        )
        return {"error": why}


def _refuse_merge(task_ids: Any) -> None:
    """Stands in for Celery's ``worker.state.merge_revoked``: nothing is ever revoked here.

    Celery's start-up sync (``hello``, both as the command and as the replies
    a starting worker collects) merges other nodes' revoked ids into this
    one's: a revoke by another name. No honest node has any (revoke is
    refused everywhere), so ids arriving this way are refused and audited.
    """
    ids = list(task_ids or ())
    if not ids:
        return
    from maas_worker.broker import transport

    log.warning("refused %d revoked task id(s) offered by another node", len(ids))
    transport.auditor.record(
        None,
        AuditReason.POLICY,
        job_id=_single_task_id({"task_id": ids}),
        detail="remote revoke refused (revoked ids in a hello)",
    )


def configure(app: Any, *, mode: str, queues: Collection[str]) -> None:
    """Make ``app``'s worker build a `GatedNode` for its pidbox (before its consumer exists)."""
    from celery.worker import state as worker_state

    GatedNode.mode = mode
    GatedNode.queues = frozenset(queues)
    app.control.mailbox.node_cls = GatedNode
    worker_state.merge_revoked = _refuse_merge


def lock_flower(mode: str) -> None:
    """Make Flower's control endpoints (its buttons) follow ``mode``.

    With ``inspect`` the buttons are hidden and their endpoints answer 403
    with the reason, before anything is sent to a worker; the views and the
    API's read-only calls are untouched.
    """
    if mode == OPERATOR_MODE:
        return
    import tornado.web
    from flower.api import control as flower_control  # type: ignore[import-untyped]

    def refuse(self: Any, *args: Any, **kwargs: Any) -> None:
        raise tornado.web.HTTPError(
            403, reason="remote control is disabled (MAAS_REMOTE_CONTROL=inspect)"
        )

    from flower.views import BaseHandler  # type: ignore[import-untyped]

    render_string = BaseHandler.render_string
    if not getattr(render_string, "maas_locked", False):

        def without_controls(self: Any, template_name: str, **kwargs: Any) -> bytes:
            html: bytes = render_string(self, template_name, **kwargs)
            return html.replace(b"</head>", _HIDE_CONTROLS + b"</head>", 1)

        without_controls.maas_locked = True  # type: ignore[attr-defined]
        BaseHandler.render_string = without_controls
    for name in dir(flower_control):
        handler = getattr(flower_control, name)
        if (
            isinstance(handler, type)
            and issubclass(handler, flower_control.ControlHandler)
            and handler is not flower_control.ControlHandler
        ):
            handler.post = tornado.web.authenticated(refuse)  # type: ignore[attr-defined]

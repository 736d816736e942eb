"""The ``kdm.teacher.registered`` Prefect event, emitted after a registration (pipeline.teachers.registry).

Kept apart from the registry so that registering never depends on Prefect: prefect is imported only
here, only when an event is to be sent, and only when a Prefect API is configured (PREFECT_API_URL);
without one no event is sent (Prefect would otherwise start a temporary local server for it). A server
with an auth string (PREFECT_SERVER_API_AUTH_STRING) needs PREFECT_API_AUTH_STRING here: Prefect's
client sends it with every request and in the events websocket's handshake. Credentials the server
refuses are reported before the event is sent (its health check answers without credentials, and the
events websocket fails in a background worker, after ``emit_event`` has returned).

Resource labels let automations select teachers: ``kdm.teacher.kind``, ``kdm.teacher.model``
(``edm`` | ``flow-matching-mlp``), ``kdm.teacher.resolution`` (image size, '' for 2-D teachers) and
``kdm.teacher.conditional`` ('true' | 'false'). The payload carries what a distillation needs:
``uri``, ``kind``, ``sha256``, ``root``, ``teacher_uri`` (the kdm teacher artifact to distill) and
``teacher_id``. The ``distill-cifar10`` deployments' triggers in prefect.yaml read it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from storage_schemas.registry import RegisteredTeacher

EVENT = "kdm.teacher.registered"


def event_fields(rec: RegisteredTeacher, root: str) -> dict:
    """``emit_event`` keyword arguments for the registration ``rec`` under ``root``."""
    resource = {
        "prefect.resource.id": rec.resource_id,
        "prefect.resource.name": rec.uri.rstrip("/").rsplit("/", 1)[-1],
        "kdm.teacher.kind": rec.kind,
        "kdm.teacher.model": rec.model_kind,
        "kdm.teacher.resolution": str(rec.img_resolution or ""),
        "kdm.teacher.conditional": "true" if rec.conditional else "false",
    }
    payload = {"uri": rec.uri, "kind": rec.kind, "sha256": rec.sha256, "root": root,
               "teacher_uri": rec.teacher_uri, "teacher_id": rec.teacher_id, "label_dim": rec.label_dim,
               "img_resolution": rec.img_resolution}
    return {"event": EVENT, "resource": resource, "payload": payload}


@dataclass(frozen=True)
class EmitResult:
    emitted: bool
    message: str   # one line for the user: where it went, or why not


def configured_api_url() -> Optional[str]:
    from prefect.settings import get_current_settings
    url = get_current_settings().api.url
    return str(url) if url else None


def credentials_problem(client) -> Optional[str]:
    """Why the API refuses this client's credentials, or None: asks an endpoint that needs them (the health
    check answers without)."""
    import httpx
    try:
        client.hello()
    except httpx.HTTPStatusError as e:
        if e.response.status_code in (401, 403):
            sent = "the auth string in PREFECT_API_AUTH_STRING" if _auth_string_set() else "no credentials"
            return (f"refused {sent} (HTTP {e.response.status_code}); set PREFECT_API_AUTH_STRING to the "
                    f"server's 'user:password' (PREFECT_SERVER_API_AUTH_STRING)")
        return f"answered HTTP {e.response.status_code} ({e.response.text[:200]})"
    return None


def _auth_string_set() -> bool:
    from prefect.settings import get_current_settings
    return get_current_settings().api.auth_string is not None


def emit_registered(rec: RegisteredTeacher, root: str, timeout: float = 30.0) -> EmitResult:
    """Send the event to the configured Prefect API and wait until it is handed over.

    Returns emitted=False with the reason when no API is configured; raises nothing for an unreachable
    API either, the caller decides (the message says what happened).
    """
    url = configured_api_url()
    if not url:
        return EmitResult(False, f"event {EVENT} not emitted: no Prefect API configured (set PREFECT_API_URL, "
                                 f"e.g. http://127.0.0.1:4200/api)")
    from prefect.client.orchestration import get_client
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    with get_client(sync_client=True) as client:
        problem = client.api_healthcheck()
        refused = None if problem is not None else credentials_problem(client)
    if problem is not None:
        return EmitResult(False, f"event {EVENT} not emitted: the Prefect API at {url} is not reachable "
                                 f"({type(problem).__name__}: {problem})")
    if refused is not None:
        return EmitResult(False, f"event {EVENT} not emitted: the Prefect API at {url} {refused}")
    event = emit_event(**event_fields(rec, root))
    if event is None:
        return EmitResult(False, f"event {EVENT} not emitted: Prefect refused to emit events to {url} (see its "
                                 f"log above)")
    _, pending = EventsWorker.drain_all(timeout=timeout, at_exit=False)
    if pending:
        return EmitResult(False, f"event {EVENT} ({event.id}) queued but not delivered to {url} within "
                                 f"{timeout:.0f} s")
    return EmitResult(True, f"event {EVENT} emitted to {url} (id {event.id}, resource {rec.resource_id})")

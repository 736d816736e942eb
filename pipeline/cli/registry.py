"""``kdm teacher register`` and ``kdm teacher list``: the teacher registry on the command line."""
from __future__ import annotations

import sys

from pipeline.cli.common import add_command, summary
from pipeline.errors import KDMError

REGISTER_EXAMPLES = """\
examples:
  kdm teacher register artifacts/teachers/edm-0123456789abcdef --root artifacts
  kdm teacher register edm-cifar10-32x32-uncond-vp.pkl --kind edm-pkl --sha256 HEX --root artifacts
  kdm teacher register s3://bucket/teachers/my-teacher --kind kdm --root s3://bucket/kdm --no-event

The record is <root>/registry/teachers/<id>.json; registering the same teacher again changes nothing.
A new registration emits the Prefect event kdm.teacher.registered when PREFECT_API_URL is set (the
distill-cifar10 deployment is triggered by it); the output says whether it was emitted. A server with
authentication needs PREFECT_API_AUTH_STRING (user:password) here too.
"""


def cmd_teacher_register(a) -> None:
    from pipeline.teachers.registry import register_teacher
    reg = register_teacher(a.root, a.uri, kind=a.kind, sha256=a.sha256)
    r = reg.record
    what = (f"{r.model_kind} {r.img_channels}x{r.img_resolution}x{r.img_resolution}, "
            f"{'conditional (' + str(r.label_dim) + ' classes)' if r.conditional else 'unconditional'}"
            if r.model_kind == "edm" else r.model_kind)
    if reg.created and r.kind == "edm-pkl":
        from pipeline.storage.manifests import read_teacher_manifest
        src = read_teacher_manifest(r.teacher_uri).source
        for w in (src.source_warnings if src else []):
            print(f"warning: {w}", file=sys.stderr)
    head = (f"registered teacher {r.id} ({r.kind}: {what}) sha256 {r.sha256[:16]}, distills {r.teacher_uri}"
            if reg.created else f"teacher {r.id} was registered at {r.registered_at}; nothing changed")
    if a.no_event:
        note = "event kdm.teacher.registered not emitted (--no-event)"
    elif not reg.created and not a.emit_again:
        note = "event kdm.teacher.registered not emitted (already registered; --emit-again sends it again)"
    else:
        from pipeline.teachers.registry import absolute_uri
        from pipeline.teachers.events import emit_registered
        res = emit_registered(r, absolute_uri(a.root))
        if not res.emitted and "no Prefect API configured" not in res.message:
            summary(head)
            raise KDMError(f"{res.message}; the registration is recorded: the scheduled redistill deployment "
                           f"will pick it up, or run this command again with --emit-again")
        note = res.message
    summary(f"{head}; {note}")


def cmd_teacher_list(a) -> None:
    from pipeline.teachers.registry import list_teachers
    recs = list_teachers(a.root)
    if a.json:
        print("[" + ",\n".join(r.model_dump_json() for r in recs) + "]")
    else:
        for r in recs:
            shape = f"{r.img_resolution}px{' cond' + str(r.label_dim) if r.conditional else ''}" if r.img_resolution else "2-D"
            print(f"{r.id}  {r.kind:<13} {shape:<10} {r.registered_at}  {r.uri}")
    if recs:
        summary(f"{len(recs)} registered teacher(s) under {a.root}")
    else:
        print(f"no teachers registered under {a.root} (kdm teacher register URI --root {a.root})", file=sys.stderr)


def add_commands(teacher_sub) -> None:
    """``register`` and ``list`` under ``kdm teacher``."""
    from storage_schemas.registry import TEACHER_KINDS
    sp = add_command(teacher_sub, "register", cmd_teacher_register,
                     "register a teacher for distillation (idempotent; emits kdm.teacher.registered)",
                     REGISTER_EXAMPLES)
    sp.add_argument("uri", help="a kdm teacher artifact directory or an EDM network pickle (any fsspec URL)")
    sp.add_argument("--kind", choices=TEACHER_KINDS, default=None,
                    help="edm-pkl: EDM network pickle (needs --sha256); kdm: kdm EDM teacher artifact; "
                         "flow-matching: kdm flow-matching teacher artifact (default: detected)")
    sp.add_argument("--sha256", default=None, help="pinned sha256 (edm-pkl: of the file, required; else of "
                                                   "the artifact's weights.safetensors, checked when given)")
    sp.add_argument("--root", default="artifacts", help="artifact root holding the registry (default artifacts)")
    sp.add_argument("--no-event", action="store_true", help="do not emit the kdm.teacher.registered event")
    sp.add_argument("--emit-again", action="store_true",
                    help="emit the event although the teacher was registered before")
    sp = add_command(teacher_sub, "list", cmd_teacher_list, "list the registered teachers",
                     "examples:\n  kdm teacher list --root artifacts\n  kdm teacher list --root s3://bucket/kdm --json")
    sp.add_argument("--root", default="artifacts")
    sp.add_argument("--json", action="store_true", help="the records as a JSON list")

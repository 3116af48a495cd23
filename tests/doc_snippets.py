"""The code blocks of README.md and docs/celery.md, run as they are written.

``snippets(path)`` reads a document's fenced code blocks. For the Celery blocks, this module is
also the app that the worker and the calling process load (``celery -A tests.doc_snippets``):
it executes the block named by ``CEX_SNIPPET`` (``path:line``) in its own namespace, with one
change: a task body written ``...`` becomes a call to :func:`work`, which records the run
(task id, task, arguments, start, end) and takes ``CEX_SNIPPET_SECONDS``. The decorators, task
options and imports are the document's own.

``python -c 'from tests.doc_snippets import drive; drive()' TASK ARGS_JSON CALLS`` is the
calling side (a process of its
own, so that the block's shared tasks never join the apps of other tests): a burst of calls, a
second burst once the first run has started, then every result; printed as JSON.
"""

from __future__ import annotations

import ast
import json
import os
import re
import sys
import time
from typing import Any, NamedTuple

import redis
from celery import Celery, current_task

from .servers import wait_until
from .workers import ROOT


class Snippet(NamedTuple):
    path: str  # relative to the repository
    line: int  # of the opening fence
    lang: str
    code: str

    @property
    def name(self) -> str:
        return f"{self.path}:{self.line}"


def snippets(path: str) -> list[Snippet]:
    """The fenced code blocks of ``path`` (relative to the repository), in order."""
    text = (ROOT / path).read_text()
    return [
        Snippet(path, text[: m.start()].count("\n") + 1, m.group(1), m.group(2))
        for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)
    ]


def snippet(name: str) -> Snippet:
    path, line = name.rsplit(":", 1)
    found = [s for s in snippets(path) if s.line == int(line)]
    if not found:
        raise LookupError(f"no code block opens at {name}")
    return found[0]


class _BodiesDoWork(ast.NodeTransformer):
    """``def f(a, b): ...`` -> ``def f(a, b): return work("f", a=a, b=b)``."""

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.FunctionDef:
        body = node.body
        if len(body) == 1 and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and value.value is Ellipsis:
                args = [a.arg for a in node.args.args]
                call = f"work({node.name!r}, {', '.join(f'{a}={a}' for a in args)})"
                node.body = [ast.parse(f"return {call}").body[0]]
        return node


def _runs_key() -> str:
    return f"{os.environ['CEX_PREFIX']}:snippet-runs"


def _client() -> redis.Redis:
    return redis.Redis.from_url(os.environ["CEX_STORE_URL"], socket_timeout=10)


def work(task: str, **arguments: Any) -> str:
    """A task body: record the run, and work for ``CEX_SNIPPET_SECONDS``."""
    lease = current_task.exclusive
    # A record for tests.history.check_history: the clock is monotonic and system-wide.
    entry: dict[str, Any] = {
        "id": current_task.request.id,
        "key": f"{task}:{json.dumps(arguments, sort_keys=True)}",
        "fence": lease.fence if lease else None,
        "pid": os.getpid(),
        "start": time.monotonic_ns() / 1e9,
    }
    deadline = time.monotonic() + float(os.environ.get("CEX_SNIPPET_SECONDS", "1"))
    while time.monotonic() < deadline:
        time.sleep(0.02)
    entry["end"] = time.monotonic_ns() / 1e9
    _client().rpush(_runs_key(), json.dumps(entry))
    return "done"


def runs() -> list[dict[str, Any]]:
    """Every recorded run, in the order they ended."""
    return [json.loads(x) for x in _client().lrange(_runs_key(), 0, -1)]


app = Celery("cex_snippets")

if os.environ.get("CEX_SNIPPET"):
    from .celery_app import configure_from

    configure_from(os.environ, target=app)
    app.set_default()
    _tree = _BodiesDoWork().visit(ast.parse(snippet(os.environ["CEX_SNIPPET"]).code))
    exec(compile(ast.fix_missing_locations(_tree), os.environ["CEX_SNIPPET"], "exec"), globals())


def _drive(task_name: str, arguments: list[Any], calls: int) -> dict[str, Any]:
    task = app.tasks[f"{__name__}.{task_name}"]
    sent: list[dict[str, Any]] = []

    def burst() -> None:
        for _ in range(calls):
            result = task.delay(*arguments)
            sent.append({"id": result.id, "at": time.time()})

    burst()
    first = sent[0]["id"]
    wait_until(lambda: _started(first), 60, "the first run to start")
    burst()
    results = {}
    for task_id in dict.fromkeys(s["id"] for s in sent):
        results[task_id] = app.AsyncResult(task_id).get(timeout=60, propagate=False)
    return {"sent": sent, "results": {k: _jsonable(v) for k, v in results.items()}}


def _started(task_id: str) -> bool:
    return app.AsyncResult(task_id).state in ("STARTED", "SUCCESS", "FAILURE")


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
    except TypeError:
        return repr(value)
    return value


def drive() -> None:
    """The calling side, from the command line (see the module's docstring)."""
    print(json.dumps(_drive(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]))))

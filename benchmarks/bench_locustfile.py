"""The locustfile benchmarks/client_cost.py runs through `harness load --locustfile`.

The same `ChatUser` as `harness load`'s default locustfile, with one difference after the stream
has been timed: the record's `id` is the server's response id (`chatcmpl-...`), so the benchmark
can pair each record with its line in the simulator's `--truth-log` exactly. Only `finish()`
(once per request) is overridden; the per-event path is the harness's own.
"""
import harness.llm_user as llm_user
import harness.plugin  # noqa: F401
from harness.timing import StreamTimer


class _ServerIdTimer(StreamTimer):
    __slots__ = ()

    def finish(self, **kw):
        rec = super().finish(**kw)
        rid = getattr(self, "response_id", None)
        if rid:
            rec.id = rid
        return rec


llm_user.StreamTimer = _ServerIdTimer


class Chat(llm_user.ChatUser):
    pass

"""The locustfile `harness load` runs.

Single target: one chat and one completions user class; `harness load` names the
one it wants on Locust's command line. Cluster (`harness load --endpoints FILE`,
passed here as HARNESS_ENDPOINTS): one user class per endpoint of the launcher's
endpoint list, equal weights, so users spread evenly over the replicas of every
model, and Locust's stats and our `by_name` report each replica on its own row.
"""
import os

import harness.plugin  # noqa: F401
from harness.llm_user import ChatUser, CompletionsUser


class Chat(ChatUser):
    pass


class Completions(CompletionsUser):
    pass


def _endpoint_classes(path: str, base: type) -> dict[str, type]:
    from servers.launcher import read_endpoints

    classes = {}
    for e in read_endpoints(path).endpoints:
        name = "Replica_" + "".join(c if c.isalnum() else "_" for c in e.name)
        classes[name] = type(name, (base,), {"host": e.url, "model": e.model, "replica": e.name,
                                             "weight": 1, "__module__": __name__})
    return classes


if os.environ.get("HARNESS_ENDPOINTS"):
    _base = CompletionsUser if os.environ.get("HARNESS_ENDPOINT_KIND") == "completions" else ChatUser
    del Chat, Completions
    globals().update(_endpoint_classes(os.environ["HARNESS_ENDPOINTS"], _base))

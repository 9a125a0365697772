"""The locustfile of `benchmarks/client_cost.py scaleout` with several simulators.

`benchmarks/bench_locustfile.py` (the record's `id` becomes the server's response id, so each
record pairs with its truth-log line), for `harness load --endpoints FILE`: one user class per
endpoint of the list (passed as HARNESS_ENDPOINTS), equal weights, so the users spread evenly
over the simulators, as `harness load`'s default locustfile does for a cluster. Without
HARNESS_ENDPOINTS it is the single-target `Chat` of bench_locustfile.py.
"""
import os
import sys

import harness.llm_user as llm_user

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_locustfile import Chat  # noqa: E402,F401  (importing it swaps in the server-id timer)


def _endpoint_classes(path: str) -> dict[str, type]:
    from servers.launcher import read_endpoints

    classes = {}
    for e in read_endpoints(path).endpoints:
        name = "Replica_" + "".join(c if c.isalnum() else "_" for c in e.name)
        classes[name] = type(name, (llm_user.ChatUser,),
                             {"host": e.url, "model": e.model, "replica": e.name, "weight": 1,
                              "__module__": __name__})
    return classes


if os.environ.get("HARNESS_ENDPOINTS"):
    del Chat
    globals().update(_endpoint_classes(os.environ["HARNESS_ENDPOINTS"]))

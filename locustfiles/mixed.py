"""Two fleets at once, weighted like the seed's mixed cluster: 8B and 70B replicas.

    LLM_SMALL_URL=http://127.0.0.1:8000 LLM_LARGE_URL=http://127.0.0.1:8001 \
        locust -f locustfiles/mixed.py

Each class has its own host, model and weight; results are reported per class
(`by_name` in summary.json) and in aggregate.
"""
import os

import harness.plugin  # noqa: F401
from harness.llm_user import ChatUser, CompletionsUser


class SmallModelChat(ChatUser):
    host = os.environ.get("LLM_SMALL_URL", "http://127.0.0.1:8000")
    model = os.environ.get("LLM_SMALL_MODEL") or None
    weight = 3


class LargeModelCompletions(CompletionsUser):
    host = os.environ.get("LLM_LARGE_URL", "http://127.0.0.1:8001")
    model = os.environ.get("LLM_LARGE_MODEL") or None
    weight = 1

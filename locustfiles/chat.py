"""Streaming chat completions: `locust -f locustfiles/chat.py --host http://127.0.0.1:8000`.

LLM options (`--llm-rate`, `--llm-input-len`, `--llm-output-len`, `--llm-model`,
`--llm-slo`, ...) are listed by `locust -f locustfiles/chat.py --help`; the LLM
percentiles come from the harness's own histograms, not Locust's rounded stats.
"""
import harness.plugin  # noqa: F401  (registers the LLM options, merge and results)
from harness.llm_user import ChatUser


class Chat(ChatUser):
    """One user: one streaming conversation at a time (or an open-loop dispatcher)."""

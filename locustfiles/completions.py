"""Streaming text completions: `locust -f locustfiles/completions.py --host http://127.0.0.1:8000`."""
import harness.plugin  # noqa: F401
from harness.llm_user import CompletionsUser


class Completions(CompletionsUser):
    """Streams `/v1/completions`."""

"""The locustfile `harness load` runs: one chat and one completions user class;
`harness load` names the one it wants on Locust's command line."""
import harness.plugin  # noqa: F401
from harness.llm_user import ChatUser, CompletionsUser


class Chat(ChatUser):
    pass


class Completions(CompletionsUser):
    pass

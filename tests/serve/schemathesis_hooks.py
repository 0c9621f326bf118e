"""schemathesis hooks (SCHEMATHESIS_HOOKS=schemathesis_hooks): the one rule of the API that its
OpenAPI schema cannot state.

POST /v1/chat/completions answers a conversation whose last message (system messages aside) is
from the user; the schema says so in words, JSON Schema has no way to say it of an array's last
item. A generated body whose messages would break only that rule gets a user message appended
(in before_call: every phase, the coverage phase included, which map_body does not reach),
so that schemathesis' positive_data_acceptance check tests the rest of the body. Invalid bodies
stay invalid (an appended valid message does not fix a wrong type elsewhere)."""

from __future__ import annotations

import schemathesis


@schemathesis.hook
def before_call(context, case, kwargs):
    """Every phase (examples, coverage, fuzzing, stateful) passes here before its request."""
    body = case.body
    if case.operation.path != "/v1/chat/completions" or not isinstance(body, dict):
        return
    messages = body.get("messages")
    if isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages):
        roles = [m.get("role") for m in messages if m.get("role") != "system"]
        if not roles or roles[-1] != "user":
            messages.append({"role": "user", "content": "Hello"})

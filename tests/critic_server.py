"""A scripted OpenAI-compatible chat server on 127.0.0.1 for the critic tests (nothing leaves the machine), and the
``serve`` fixture that starts one per script and stops it after the test."""

import threading
import time
from collections import Counter

import pytest

from json_http_stub import JsonHttpStub


class FakeCritic(JsonHttpStub):
    """``POST /v1/chat/completions`` answering from a script keyed by the question of the last user message (by
    ``key(body)`` when given: another prompt layout).

    ``script[question]`` is a list of actions, one per call for that question (the last one repeats):
    ``("answer", text)``, ``("status", code)``, ``("echo", code)`` (an error whose message repeats the request's
    Authorization header, as a careless endpoint might), ``("hang", seconds)`` (answer nothing for that long, then
    drop the connection) and ``("slow", seconds, text)`` (answer after a delay). Every request body is recorded.
    """

    def __init__(self, script, key=None):
        self.script = script
        self.key = key or self.question_of
        self.bodies = []
        self.calls = Counter()
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0
        super().__init__()
        self.url += "/v1"  # the API base a client is given

    @staticmethod
    def question_of(body):
        query = body["messages"][-1]["content"]
        return query[len("Question: "):query.index("\n\n Solutions: ")]

    def handle(self, handler, body):
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            self.answer(handler, body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (its timeout) before we answered
        finally:
            with self.lock:
                self.in_flight -= 1

    def answer(self, handler, body):
        assert handler.path == "/v1/chat/completions"
        question = self.key(body)
        with self.lock:
            self.bodies.append(body)
            call = self.calls[question]
            self.calls[question] += 1
        actions = self.script[question]
        action = actions[min(call, len(actions) - 1)]
        if action[0] == "status":
            self.send(handler, action[1], {"error": {"message": f"scripted {action[1]}", "type": "test"}})
        elif action[0] == "echo":
            message = f"refused {handler.headers.get('Authorization')} on {handler.path}"
            self.send(handler, action[1], {"error": {"message": message, "type": "test"}})
        elif action[0] == "hang":
            time.sleep(action[1])
            handler.close_connection = True
        else:
            if action[0] == "slow":
                time.sleep(action[1])
            self.send(handler, 200, {
                "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": action[-1]}}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            })


@pytest.fixture
def serve():
    servers = []

    def start(script, key=None):
        servers.append(FakeCritic(script, key))
        return servers[-1]

    yield start
    for server in servers:
        server.close()

"""A scripted OpenAI-compatible chat server on 127.0.0.1 for the critic tests (nothing leaves the machine), and the
``serve`` fixture that starts one per script and stops it after the test."""

import http.server
import json
import threading
import time
from collections import Counter

import pytest


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    # The default listen backlog (5) overflows when all the client's connections open at once; the dropped
    # handshakes then stall for a TCP retransmission (~1 s) and make request counts and timings flaky.
    request_queue_size = 128


class FakeCritic:
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
        critic = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with critic.lock:
                    critic.in_flight += 1
                    critic.max_in_flight = max(critic.max_in_flight, critic.in_flight)
                try:
                    critic.handle(self, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout) before we answered
                finally:
                    with critic.lock:
                        critic.in_flight -= 1

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def question_of(body):
        query = body["messages"][-1]["content"]
        return query[len("Question: "):query.index("\n\n Solutions: ")]

    def handle(self, handler, body):
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

    @staticmethod
    def send(handler, status, payload):
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)


@pytest.fixture
def serve():
    servers = []

    def start(script, key=None):
        servers.append(FakeCritic(script, key))
        return servers[-1]

    yield start
    for server in servers:
        server.close()

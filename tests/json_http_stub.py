"""What the tests' HTTP stand-ins for remote services share: a threaded server on 127.0.0.1 (nothing leaves the
machine) that hands every POST's JSON body to the stand-in, and JSON answers."""

import http.server
import json
import threading


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    # The default listen backlog (5) overflows when all the client's connections open at once; the dropped
    # handshakes then stall for a TCP retransmission (~1 s) and make request counts and timings flaky.
    request_queue_size = 128


class JsonHttpStub:
    """Serves on a free port of 127.0.0.1 (``self.url``) from construction until :meth:`close`; each POST goes to
    ``self.handle(handler, body)`` with its JSON body, on the server's thread for that connection."""

    def __init__(self):
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                stub.handle(self, json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def handle(self, handler: http.server.BaseHTTPRequestHandler, body) -> None:
        raise NotImplementedError

    @staticmethod
    def send(handler: http.server.BaseHTTPRequestHandler, status: int, payload) -> None:
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

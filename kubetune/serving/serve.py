"""A small OpenAI-compatible server for a local transformers model folder.

Serves ``POST /v1/chat/completions`` and ``GET /v1/models`` (plus ``GET /health``) with the
standard library's threaded HTTP server: enough for the MoA tests and for local smoke runs
of :class:`kubetune.methods.moa.HttpProposer` against something that speaks the protocol vLLM and
KServe speak, without installing a serving stack. Generation is greedy; ``temperature`` and
other sampling fields are accepted and ignored.

Usage::

    python -m kubetune.serving.serve --model DIR --port 8000 [--delay 5]

``--port 0`` picks a free port; the first line printed names the address either way.
``--delay`` sleeps that many seconds before each answer, to exercise client timeouts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from kubetune.methods.moa import LocalProposer


def make_server(
    proposer: LocalProposer, *, host: str = "127.0.0.1", port: int = 0, model_id: str | None = None, delay: float = 0.0
) -> ThreadingHTTPServer:
    """Build (not start) a threaded HTTP server answering with ``proposer``.

    Args:
        proposer: The model that answers.
        host: Interface to bind; loopback by default.
        port: Port to bind; 0 picks a free one (read it from ``server.server_address``).
        model_id: The id listed by ``/v1/models``; defaults to the proposer's name. Requests
            naming another model are still answered (one model per server).
        delay: Seconds to sleep before each answer.

    Returns:
        The server; call ``serve_forever()`` on it.
    """
    model_id = model_id or proposer.name
    created = int(time.time())

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (its timeout); nothing to do

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path.rstrip("/") == "/v1/models":
                self._send(
                    200,
                    {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": "kubetune"}]},
                )
            elif self.path.rstrip("/") == "/health":
                self._send(200, {"status": "ok"})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})

        def do_POST(self) -> None:  # noqa: N802
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                return
            try:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                messages = request["messages"]
                max_tokens = int(request.get("max_tokens") or request.get("max_completion_tokens") or proposer.max_new_tokens)
            except (ValueError, KeyError, TypeError) as err:
                self._send(400, {"error": {"message": f"bad request: {err}", "type": "invalid_request_error"}})
                return
            if delay:
                time.sleep(delay)
            completion = proposer(messages, max_tokens)
            # Prompt tokens are not counted: the MoA evaluation's cost measure is tokens
            # generated, and counting the prompt would mean templating it a second time.
            self._send(
                200,
                {
                    "id": f"chatcmpl-{uuid.uuid4().hex}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model_id,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": completion.text},
                            "finish_reason": "length" if completion.tokens >= max_tokens else "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 0, "completion_tokens": completion.tokens, "total_tokens": completion.tokens},
                },
            )

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - signature from the base class
            pass  # one line per request on stderr is noise in tests and pipeline logs

    server = ThreadingHTTPServer((host, port), Handler)
    # Handler threads must not keep the process alive after shutdown (a client that timed
    # out leaves its request still generating).
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, load the model, serve until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m kubetune.serving.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="transformers model folder (or folder of --gguf-file)")
    parser.add_argument("--port", type=int, default=8000, help="port to bind; 0 picks a free one")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind")
    parser.add_argument("--name", default=None, help="model id reported by /v1/models (default: folder name)")
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="default max_tokens")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to sleep before each answer (timeout tests)")
    args = parser.parse_args(argv)

    proposer = LocalProposer(
        args.model, name=args.name or Path(args.model).name, max_new_tokens=args.max_new_tokens, gguf_file=args.gguf_file
    ).load()  # load before listening, so "listening" means "ready to answer"
    server = make_server(proposer, host=args.host, port=args.port, delay=args.delay)
    host, port = server.server_address[:2]
    print(f"kubetune.serving.serve listening on http://{host}:{port} model={proposer.name}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main(sys.argv[1:])

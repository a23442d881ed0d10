r"""A reference reward server: any registered reward over HTTP (the `remote` reward's peer).

  python -m euphonium_jax.rewards.serve --reward jpeg_compressibility --port 8000
  python -m euphonium_jax.rewards.serve --reward my_judge --import my_pkg.rewards \
      --set path=/models/judge --port 8001 --host 0.0.0.0

`--import` loads modules that `@register` a reward (a PyTorch or VLM scorer wrapped in a
Python function); `--set key=value` fills a configurable reward's settings (the values are
Python literals, else strings). Endpoints (wire format: euphonium_jax/rewards/remote.py):
POST /score, GET /health. `--port 0` picks a free port; the first line on stdout is always
`serving <reward> on http://host:port`. Requests are answered by threads; `--workers` of
them score at once (default 1: the reward sees one batch at a time, as a GPU model would).
Statuses: 200 scores, 400 a malformed request, 404 another path, 422 the reward raised.

For measuring and for testing clients: `--sleep S` waits S seconds per scored request (a
slow judge); `--max-requests N` exits after answering N score requests (a server that dies);
`--fault` answers wrongly: malformed_json, wrong_count, nonfinite, http_500.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from euphonium_jax.rewards import registry
from euphonium_jax.rewards import remote

FAULTS = ("none", "malformed_json", "wrong_count", "nonfinite", "http_500")


def _literal(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m euphonium_jax.rewards.serve",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--reward", required=True, help="a registered reward's name")
  p.add_argument("--port", type=int, required=True, help="0 = a free port")
  p.add_argument("--host", default="127.0.0.1")
  p.add_argument("--import", dest="modules", action="append", default=[],
                 help="a module that registers rewards (repeatable)")
  p.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                 help="a setting of a configurable reward (repeatable)")
  p.add_argument("--workers", type=int, default=1, help="requests scored at once")
  p.add_argument("--sleep", type=float, default=0.0, help="seconds to wait per scored request")
  p.add_argument("--max-requests", type=int, default=0,
                 help="exit after answering this many score requests (0 = never)")
  p.add_argument("--fault", choices=FAULTS, default="none")
  p.add_argument("--verbose", action="store_true", help="log every request to stderr")
  return p.parse_args(argv)


def make_scorer(args):
  """The built reward of `args` (settings from --set), or SystemExit naming the problem."""
  for m in args.modules:
    importlib.import_module(m)
  if not registry.is_known(args.reward):
    raise SystemExit(f"unknown reward {args.reward!r}; registered: {registry.names()}")
  values = {}
  for item in args.settings:
    key, sep, value = item.partition("=")
    if not sep:
      raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
    values[key] = _literal(value)
  if values and not registry.is_configurable(args.reward):
    raise SystemExit(f"--set: the reward {args.reward!r} takes no settings")
  settings = registry.default_settings(args.reward) if registry.is_configurable(
      args.reward) else None
  if settings is not None:
    problems = registry.check_settings(args.reward, dict(settings.items()) | values)
    if problems:
      raise SystemExit("\n".join(problems))
    settings.update(values)
  return registry.build(args.reward, settings)


class Server(ThreadingHTTPServer):
  daemon_threads = True

  def __init__(self, address, args, scorer):
    super().__init__(address, Handler)
    self.args, self.scorer = args, scorer
    self.slots = threading.Semaphore(max(1, args.workers))
    self.count_lock = threading.Lock()
    self.answered = 0


class Handler(BaseHTTPRequestHandler):
  server: Server
  protocol_version = "HTTP/1.1"

  def log_message(self, fmt, *args):
    if self.server.args.verbose:
      super().log_message(fmt, *args)

  def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
    self.send_response(status)
    self.send_header("Content-Type", ctype)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)
    self.wfile.flush()

  def _json(self, status: int, obj) -> None:
    self._send(status, json.dumps(obj).encode("utf-8"))

  def do_GET(self):
    if self.path.rstrip("/") != "/health":
      return self._json(404, {"error": f"no {self.path}: GET /health or POST /score"})
    self._json(200, {"status": "ok", "reward": self.server.args.reward,
                     "version": remote.VERSION})

  def do_POST(self):
    a = self.server.args
    if self.path.rstrip("/") != "/score":
      return self._json(404, {"error": f"no {self.path}: POST /score"})
    try:
      length = int(self.headers.get("Content-Length", "0"))
      header, frames = remote.decode_request(self.rfile.read(length))
    except ValueError as e:
      return self._json(400, {"error": f"malformed request: {e}"})
    with self.server.slots:
      if a.sleep:
        time.sleep(a.sleep)
      if a.fault == "http_500":
        return self._json(500, {"error": "injected fault (--fault http_500)"})
      try:
        x = frames.astype(np.float32) / np.float32(255.0)
        scores = registry.score(self.server.scorer, x, header["prompts"], header["metadata"],
                                who="serve", kind="reward")
      except registry.RewardError as e:
        return self._json(422, {"error": str(e)})
    scores = [float(v) for v in scores]
    if a.fault == "wrong_count":
      scores = scores[:-1]
    if a.fault == "nonfinite":
      scores[0] = float("nan")  # json writes NaN: not standard JSON, read by Python's
    body = json.dumps({"scores": scores, "reward": a.reward}).encode("utf-8")
    if a.fault == "malformed_json":
      body = body[:len(body) // 2]
    self._send(200, body)
    with self.server.count_lock:
      self.server.answered += 1
      if a.max_requests and self.server.answered >= a.max_requests:
        print(f"answered {self.server.answered} requests (--max-requests): exiting",
              file=sys.stderr, flush=True)
        os._exit(3)


def main(argv=None) -> None:
  args = parse_args(argv)
  scorer = make_scorer(args)
  server = Server((args.host, args.port), args, scorer)
  host, port = server.server_address[:2]
  print(f"serving {args.reward} on http://{host}:{port}", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()


if __name__ == "__main__":
  main()

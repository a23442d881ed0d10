"""A reward scored by a server over HTTP: `remote` (and `remote_<label>` for several servers).

The client POSTs a batch of videos (uint8 frames, prompts, prompt metadata) to
`<url>/score` and reads one score per video back; `python -m euphonium_jax.rewards.serve`
is a reference server for any registered reward. Wire format (version 1):

  request  POST <url>/score, Content-Type: application/x-euphonium-batch, body =
           uint32 little-endian n | n bytes of UTF-8 JSON header | frames
           header = {"version": 1, "reward": <the client's reward name>,
                     "shape": [B, T, H, W, 3], "dtype": "uint8",
                     "frame_indices": [the T indices sent, of the video's frames],
                     "num_frames": frames per video, "prompts": [B str],
                     "metadata": [B dicts]}
           frames = B*T*H*W*3 bytes, C order, round(clip(x, 0, 1) * 255)
  answer   200, application/json: {"scores": [B numbers]} (other keys are ignored);
           any other status is a failure (its body, e.g. {"error": ...}, is quoted)
  health   GET <url>/health -> 200 {"status": "ok", "reward": ..., "version": 1}

JSON carries the small, structured part (any language reads it, metadata stays as the
prompt file wrote it); the frames follow as raw bytes: no base64 (a third larger and slow to
encode), no numpy-only container (npz), one `frombuffer(...).reshape(shape)` on the server.
uint8 is what every image model's preprocessing starts from and a quarter of float32.

Failures raise `RemoteRewardError` naming the reward, the URL and the HTTP status or
exception; an answer with the wrong number of scores, a non-finite score or malformed JSON
is named the same way. Connection errors, timeouts and HTTP 408 / 429 / 5xx are retried
(`retries` times, waiting `backoff_s * 2**k`); an answer that arrived but is wrong is not
(asking again gets the same answer). A batch is split into requests of `batch_size`
videos, up to `max_in_flight` of them at once: while the server scores chunk j, chunk j+1
is quantised, encoded and sent.
"""

from __future__ import annotations

import http.client
import json
import math
import socket
import struct
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent import futures
from typing import Sequence

import numpy as np

from euphonium_jax.rewards.registry import register_factory

VERSION = 1
CONTENT_TYPE = "application/x-euphonium-batch"
FRAME_MODES = ("all", "first", "last", "every")
RETRY_STATUS = (408, 429, 500, 502, 503, 504)

DEFAULTS = dict(
    url="",  # the server: http(s)://host:port[/prefix]; POST <url>/score, GET <url>/health
    timeout_s=60.0,  # per request: connecting, and each wait for the answer's bytes
    retries=2,  # more attempts after a failed one (connection, timeout, HTTP 408/429/5xx)
    backoff_s=1.0,  # the wait before retry k (1, 2, ...) is backoff_s * 2 ** (k - 1)
    batch_size=0,  # videos per request (the server's batch size); 0 = the batch in one
    max_in_flight=2,  # requests of one batch at once (chunk j+1 is sent while j is scored)
    frames="all",  # frames sent per video: all | first | last | every (every k-th, from 0)
    every=4,  # k of frames='every'
    health_check=True,  # GET <url>/health when the run builds the reward (before rollouts)
)


class RemoteRewardError(RuntimeError):
  """A remote reward that could not score: names the reward, the URL and what happened."""


def check(s) -> list[str]:
  """Problems of the `remote` settings, each naming key, value and what is allowed."""
  p, k = [], "config.rewards.remote"
  url = urllib.parse.urlsplit(s.url) if isinstance(s.url, str) else None
  if not s.url or url is None or url.scheme not in ("http", "https") or not url.netloc:
    p.append(f"{k}.url = {s.url!r} is invalid: the server's address is required, "
             "http(s)://host:port (start one with python -m euphonium_jax.rewards.serve)")
  if not s.timeout_s > 0:
    p.append(f"{k}.timeout_s = {s.timeout_s!r} is invalid: must be > 0 (seconds)")
  for key in ("retries", "batch_size"):
    if s[key] < 0:
      p.append(f"{k}.{key} = {s[key]!r} is invalid: must be >= 0")
  if s.backoff_s < 0:
    p.append(f"{k}.backoff_s = {s.backoff_s!r} is invalid: must be >= 0 (seconds)")
  if s.max_in_flight < 1:
    p.append(f"{k}.max_in_flight = {s.max_in_flight!r} is invalid: must be >= 1")
  if s.frames not in FRAME_MODES:
    p.append(f"{k}.frames = {s.frames!r} is invalid: allowed values are "
             f"{', '.join(map(repr, FRAME_MODES))}")
  if s.every < 1:
    p.append(f"{k}.every = {s.every!r} is invalid: must be >= 1 (with frames='every')")
  return p


def frame_indices(num_frames: int, mode: str, every: int) -> list[int]:
  """Which of a video's `num_frames` frames are sent under `mode`."""
  if mode == "first":
    return [0]
  if mode == "last":
    return [num_frames - 1]
  if mode == "every":
    return list(range(0, num_frames, every))
  return list(range(num_frames))


def to_uint8(frames) -> np.ndarray:
  """float [..., 3] in [0, 1] -> uint8 round(clip(x) * 255) (report.py's and JPEG's rule)."""
  x = np.asarray(frames, np.float32)
  return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def encode_request(reward: str, frames_u8: np.ndarray, prompts: Sequence[str],
                   metadata: Sequence[dict], frame_indices_: Sequence[int],
                   num_frames: int) -> bytes:
  """The request body of one batch (see the module docstring)."""
  frames_u8 = np.ascontiguousarray(frames_u8, np.uint8)
  header = {"version": VERSION, "reward": reward, "shape": list(frames_u8.shape),
            "dtype": "uint8", "frame_indices": [int(i) for i in frame_indices_],
            "num_frames": int(num_frames), "prompts": [str(p) for p in prompts],
            "metadata": [dict(m) for m in metadata]}
  head = json.dumps(header).encode("utf-8")
  return struct.pack("<I", len(head)) + head + frames_u8.tobytes()


def decode_request(body: bytes) -> tuple[dict, np.ndarray]:
  """(header, uint8 frames [B, T, H, W, 3]) of a request body; ValueError if malformed."""
  if len(body) < 4:
    raise ValueError(f"the body has {len(body)} bytes, fewer than the 4 of the header length")
  (n,) = struct.unpack("<I", body[:4])
  if 4 + n > len(body):
    raise ValueError(f"the header length {n} runs past the body ({len(body)} bytes)")
  try:
    header = json.loads(body[4:4 + n].decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"the header is not UTF-8 JSON: {e}") from None
  if not isinstance(header, dict) or header.get("version") != VERSION:
    raise ValueError(f"expected a JSON object with version {VERSION}")
  shape = tuple(int(d) for d in header.get("shape", ()))
  if len(shape) != 5 or shape[-1] != 3 or header.get("dtype") != "uint8":
    raise ValueError(f"shape {shape} / dtype {header.get('dtype')!r}: expected "
                     "[B, T, H, W, 3] uint8")
  size = math.prod(shape)
  if len(body) - 4 - n != size:
    raise ValueError(f"{len(body) - 4 - n} frame bytes for shape {list(shape)} ({size} bytes)")
  for key in ("prompts", "metadata"):
    if len(header.get(key, ())) != shape[0]:
      raise ValueError(f"{len(header.get(key, ()))} {key} for {shape[0]} videos")
  return header, np.frombuffer(body, np.uint8, size, 4 + n).reshape(shape)


class _Transient(Exception):
  """A failure worth another attempt (connection, timeout, HTTP 408/429/5xx)."""


class RemoteReward:
  """The `remote` reward: `fn(frames [B, T, H, W, 3] in [0, 1], prompts, metadata) -> [B]`."""

  def __init__(self, name: str, settings):
    self.reward_name = name
    self.url = settings.url.rstrip("/")
    self.timeout_s = float(settings.timeout_s)
    self.retries = int(settings.retries)
    self.backoff_s = float(settings.backoff_s)
    self.batch_size = int(settings.batch_size)
    self.max_in_flight = int(settings.max_in_flight)
    self.frames = settings.frames
    self.every = int(settings.every)
    self.server_reward = None
    self._lock = threading.Lock()
    self.requests = 0  # answered requests (for reports and tests)
    if settings.health_check:
      self.health()

  # ------------------------------------------------------------------------- HTTP
  def _fail(self, what: str, path: str = "/score") -> RemoteRewardError:
    return RemoteRewardError(f"remote reward {self.reward_name!r} at {self.url}{path}: {what}")

  def _once(self, path: str, body: bytes | None) -> bytes:
    """One request; the answer's body on 200. _Transient or RemoteRewardError otherwise."""
    req = urllib.request.Request(self.url + path, data=body, method="POST" if body else "GET")
    if body is not None:
      req.add_header("Content-Type", CONTENT_TYPE)
    try:
      with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
        return resp.read()
    except urllib.error.HTTPError as e:
      text = e.read()[:300].decode("utf-8", "replace")
      what = f"HTTP {e.code} {e.reason}: {text}"
      if e.code in RETRY_STATUS:
        raise _Transient(what) from None
      raise self._fail(what, path) from None
    except (TimeoutError, socket.timeout) as e:
      raise _Transient(f"no answer within timeout_s = {self.timeout_s} s ({e})") from None
    except urllib.error.URLError as e:
      reason = e.reason
      if isinstance(reason, (TimeoutError, socket.timeout)):
        raise _Transient(f"no answer within timeout_s = {self.timeout_s} s ({reason})") from None
      raise _Transient(f"{type(reason).__name__}: {reason}") from None
    except (http.client.HTTPException, ConnectionError, OSError) as e:
      raise _Transient(f"{type(e).__name__}: {e}") from None

  def _request(self, path: str, body: bytes | None, what: str) -> bytes:
    """`_once` with retries and exponential backoff; RemoteRewardError when all fail."""
    attempts = self.retries + 1
    for k in range(attempts):
      if k:
        time.sleep(self.backoff_s * 2 ** (k - 1))
      try:
        return self._once(path, body)
      except _Transient as e:
        last = str(e)
    raise self._fail(f"{last} ({what}; {attempts} attempt{'s' * (attempts > 1)})", path)

  def health(self) -> dict:
    """GET <url>/health: the server's answer (its reward's name), or RemoteRewardError."""
    raw = self._request("/health", None, "health check")
    try:
      info = json.loads(raw)
      ok = isinstance(info, dict) and info.get("status") == "ok"
    except (json.JSONDecodeError, UnicodeDecodeError):
      ok = False
    if not ok:
      raise self._fail(f"the health check answered {raw[:200]!r}, expected a JSON object "
                       "with status 'ok'", "/health")
    self.server_reward = info.get("reward")
    return info

  # ----------------------------------------------------------------------- Scoring
  def _score_chunk(self, frames, lo: int, hi: int, total: int, idx: list[int],
                   prompts: Sequence[str], metadata: Sequence[dict]) -> np.ndarray:
    chunk = to_uint8(np.asarray(frames[lo:hi])[:, idx])
    body = encode_request(self.reward_name, chunk, prompts[lo:hi], metadata[lo:hi], idx,
                          np.shape(frames)[1])
    what = f"videos {lo}..{hi - 1} of {total}"
    raw = self._request("/score", body, what)
    try:
      answer = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise self._fail(f"malformed JSON in the answer ({e}; {what}): {raw[:200]!r}") from None
    scores = answer.get("scores") if isinstance(answer, dict) else None
    if not isinstance(scores, list):
      raise self._fail(f"the answer has no 'scores' list ({what}): {raw[:200]!r}")
    if len(scores) != hi - lo:
      raise self._fail(f"answered {len(scores)} scores for {hi - lo} videos ({what})")
    for i, v in enumerate(scores):
      if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
        raise self._fail(f"answered a non-finite or non-numeric score {v!r} for video "
                         f"{lo + i} (prompt {prompts[lo + i]!r}; {what})")
    with self._lock:
      self.requests += 1
    return np.asarray(scores, np.float32)

  def __call__(self, frames, prompts: Sequence[str], metadata: Sequence[dict] | None = None
               ) -> np.ndarray:
    """float32 [B]: the server's scores of frames [B, T, H, W, 3] in [0, 1]."""
    prompts = list(prompts)
    n = len(prompts)
    metadata = list(metadata) if metadata is not None else [{} for _ in range(n)]
    if np.shape(frames)[0] != n or len(metadata) != n:
      raise ValueError(f"{np.shape(frames)[0]} videos, {n} prompts, {len(metadata)} metadata")
    idx = frame_indices(np.shape(frames)[1], self.frames, self.every)
    size = self.batch_size or n
    bounds = [(lo, min(lo + size, n)) for lo in range(0, n, size)]
    if len(bounds) == 1 or self.max_in_flight == 1:
      parts = [self._score_chunk(frames, lo, hi, n, idx, prompts, metadata) for lo, hi in bounds]
    else:
      with futures.ThreadPoolExecutor(min(self.max_in_flight, len(bounds))) as pool:
        jobs = [pool.submit(self._score_chunk, frames, lo, hi, n, idx, prompts, metadata)
                for lo, hi in bounds]
        parts = [j.result() for j in jobs]  # the first failing chunk's error, in order
    return np.concatenate(parts) if parts else np.zeros((0,), np.float32)

  def __repr__(self) -> str:
    return f"<remote reward {self.reward_name} at {self.url}>"


@register_factory("remote", defaults=DEFAULTS, check=check, io_bound=True, instances=True)
def remote(settings, name: str = "remote") -> RemoteReward:
  """The reward `name` (`remote` or `remote_<label>`) of its settings section."""
  return RemoteReward(name, settings)

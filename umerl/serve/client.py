"""A small Python client for the embedding service (``umerl serve``); standard library only.

    from umerl.serve.client import EmbeddingClient, image_input
    client = EmbeddingClient("http://127.0.0.1:8000")
    vectors = client.embed(["a red square", image_input("cat.png", "a photo")], mode="auto")

One client keeps one HTTP(S) connection; use one client per thread. ``api_key`` (default: the
``UMERL_API_KEY`` environment variable) is sent as ``Authorization: Bearer``; an ``https://``
URL is verified against the system's CAs or ``cafile``. A 503 (the service shedding load) is
retried up to ``retries`` times, waiting its ``Retry-After`` (or a doubling back-off).
With ``proxy_url`` (Serve's proxy) and a replica's direct URL as ``base_url``, a connection
error (the replica restarted, on another port) makes the client re-read the live replicas'
direct URLs from the proxy's ``/v1/models`` and retry once on one of them (or on the proxy
when none is listed).
Embeddings travel as base64 float32 by default (``encoding_format``, as OpenAI's client does):
the same float32 values as the float lists, in a quarter of the text and without printing or
parsing floats.
"""

from __future__ import annotations

import base64
import http.client
import json
import mimetypes
import os
import random
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np


class ServiceError(RuntimeError):
    """The service answered with an error: its HTTP status and the field it named."""

    def __init__(self, status: int, field: str | None, message: str,
                 retry_after_s: float | None = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.field = field
        self.retry_after_s = retry_after_s


def data_url(path: str | Path) -> str:
    """A local image file as a base64 data URL (how the service takes media)."""
    path = Path(path)
    kind = mimetypes.guess_type(path.name)[0] or "image/png"
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def image_input(path: str | Path, text: str = "") -> dict[str, Any]:
    return {"text": text, "image": data_url(path)}


def video_input(frames: Sequence[str | Path], text: str = "") -> dict[str, Any]:
    return {"text": text, "video": [data_url(f) for f in frames]}


def decode_embedding(value: str | Sequence[float]) -> np.ndarray:
    """An embedding as the service sends it (a list of floats, or base64 float32 little-endian
    bytes) as a float32 vector."""
    if isinstance(value, str):
        return np.frombuffer(base64.b64decode(value), dtype="<f4").astype(np.float32)
    return np.asarray(value, dtype=np.float32)


@dataclass
class Embeddings:
    """A response: one row per input, the mode each used, and the raw JSON."""

    vectors: np.ndarray  # [N, hidden] float32
    modes: list[str]
    raw: dict[str, Any]  # embeddings as sent: float lists or base64 strings

    @property
    def samples(self) -> list[np.ndarray]:
        """With ``samples=k``: per input a [k, hidden] array."""
        return [np.stack([decode_embedding(s) for s in item["samples"]])
                for item in self.raw["data"]]

    @property
    def reasoning(self) -> list[Any]:
        return [item.get("reasoning") for item in self.raw["data"]]


class EmbeddingClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8000", model: str | None = None,
                 timeout_s: float = 600.0, api_key: str | None = None,
                 cafile: str | Path | None = None, retries: int = 3, backoff_s: float = 0.5,
                 proxy_url: str | None = None):
        self.model = model
        self.timeout_s = timeout_s
        self.api_key = os.environ.get("UMERL_API_KEY") if api_key is None else api_key
        self.cafile = cafile
        self.retries, self.backoff_s = retries, backoff_s
        self.proxy_url = proxy_url
        self._conn: http.client.HTTPConnection | None = None
        self._target(base_url)

    def _target(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be http(s)://HOST:PORT, got {base_url!r}")
        self.close()
        self.base_url = base_url.rstrip("/")
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname, parts.port or (443 if self.https else 80)
        self.ssl_context = (ssl.create_default_context(
            cafile=None if self.cafile is None else str(self.cafile)) if self.https else None)

    def embed(self, inputs: Sequence[str | dict[str, Any]] | str, mode: str = "disc",
              samples: int | None = None, return_reasoning: bool = False,
              encoding_format: str = "base64") -> Embeddings:
        body: dict[str, Any] = {"input": inputs if isinstance(inputs, str) else list(inputs),
                                "mode": mode, "return_reasoning": return_reasoning,
                                "encoding_format": encoding_format}
        if self.model:
            body["model"] = self.model
        if samples is not None:
            body["samples"] = samples
        raw = self.request("POST", "/v1/embeddings", json.dumps(body).encode())
        data = sorted(raw["data"], key=lambda item: item["index"])
        return Embeddings(np.stack([decode_embedding(d["embedding"]) for d in data]),
                          [d["mode"] for d in data], raw)

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/health")

    def models(self) -> dict[str, Any]:
        return self.request("GET", "/v1/models")

    def request(self, method: str, path: str, body: bytes | None = None) -> dict[str, Any]:
        """One request; raises ``ServiceError`` on a 4xx or 5xx. A 503 is retried after its
        ``Retry-After`` (else a doubling back-off), up to ``retries`` times; a connection
        error, with ``proxy_url``, once on a live replica's direct URL."""
        try:
            return self._shed_retries(method, path, body)
        except (ConnectionError, http.client.HTTPException):
            if not self.proxy_url or self.base_url == self.proxy_url.rstrip("/"):
                raise
            self._target(self._live_url())
            return self._shed_retries(method, path, body)

    def _live_url(self) -> str:
        """A live replica's direct URL from the proxy (this one again if it is still listed:
        the error was passing), or the proxy itself when it lists none."""
        proxy = EmbeddingClient(self.proxy_url, timeout_s=self.timeout_s, api_key=self.api_key,
                                cafile=self.cafile, retries=self.retries,
                                backoff_s=self.backoff_s)
        try:
            urls = [u.rstrip("/") for u in proxy.models().get("direct_urls", [])]
        finally:
            proxy.close()
        if self.base_url in urls:
            return self.base_url
        return random.choice(urls) if urls else self.proxy_url  # spread clients over replicas

    def _shed_retries(self, method: str, path: str, body: bytes | None) -> dict[str, Any]:
        for attempt in range(self.retries + 1):
            try:
                return self._request_once(method, path, body)
            except ServiceError as err:
                if err.status != 503 or attempt == self.retries:
                    raise
                time.sleep(err.retry_after_s or self.backoff_s * 2 ** attempt)
        raise AssertionError("unreachable")

    def _request_once(self, method: str, path: str, body: bytes | None) -> dict[str, Any]:
        """Reconnects once if the kept connection was closed by the server in between."""
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in (0, 1):
            conn = self._connection()
            try:
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                payload = response.read()
                break
            except (ConnectionError, http.client.HTTPException):
                self.close()
                if attempt:
                    raise
        try:
            result = json.loads(payload) if payload else {}
        except ValueError:  # not the service's JSON (e.g. Serve's proxy before deployment)
            result = {"error": {"message": payload.decode(errors="replace")}}
            if response.status < 400:
                raise ServiceError(response.status, None, "response is not JSON") from None
        if response.status >= 400:
            error = result.get("error", {}) if isinstance(result, dict) else {}
            if not isinstance(error, dict):
                error = {"message": str(error)}
            retry_after = response.getheader("Retry-After")
            raise ServiceError(response.status, error.get("param"),
                               error.get("message", payload.decode(errors="replace")),
                               float(retry_after) if retry_after and
                               retry_after.replace(".", "", 1).isdigit() else None)
        return result

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self.https:
                self._conn = http.client.HTTPSConnection(self.host, self.port,
                                                         timeout=self.timeout_s,
                                                         context=self.ssl_context)
            else:
                self._conn = http.client.HTTPConnection(self.host, self.port,
                                                        timeout=self.timeout_s)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

"""The embedding service: disc, gen and routed (auto) embeddings over HTTP, on Ray Serve.

    POST /v1/embeddings  {"model", "input": [...], "mode": disc|gen|auto, "samples", ...}
    GET  /v1/models, GET /health

Three layers, in this order in the file:

1. **The edge** (``parse_request``): the request body is checked completely before any model
   work: JSON, fields, modes, limits, and every image or video frame is a base64 data URL that
   decodes to an image within the size limits. Each problem is a ``RequestError`` (a 4xx whose
   JSON names the field). Media arrive as bytes only, so nothing a request sends can name a
   file on the server; the replica writes them into its own temporary folder, under names it
   chooses, for the encoder to read, and removes them when the request is answered.
2. **The model work** (``Embedder``): ``umerl.model.embed``'s disc and gen embeddings with the same
   greedy settings as ``umerl eval``, so a served embedding equals the in-process one.
3. **The Serve deployment** (``EmbeddingService``): per replica one model, two dynamic batchers
   (``Batcher``; disc and gen apart, since a generation batch takes seconds and a disc batch
   milliseconds), and the HTTP routes (plain Starlette requests, so every error is this
   module's JSON rather than a framework's).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import hashlib
import hmac
import io
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
from omegaconf import DictConfig
from PIL import Image
from ray import serve

from umerl.config.schema import DIRECT_PORT_SPAN
from umerl.data.formats import Side
from umerl.data.tokens import control_token_problem
from umerl.eval.router import Router
from umerl.runtime.devices import engine_for, use_reserved_cpus

MODES = ("disc", "gen", "auto")
ENCODING_FORMATS = ("float", "base64")  # base64: float32 little-endian bytes, as OpenAI's
IMAGE_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "BMP": "bmp", "GIF": "gif"}
MAX_ASPECT_RATIO = 200  # the Qwen-VL resize refuses more
APP_NAME = "umerl-embeddings"
# A body this small parses and checks in well under a millisecond, less than a thread hop costs.
INLINE_PARSE_BYTES = 64 << 10
logger = logging.getLogger("umerl.serve.service")


# ---------------------------------------------------------------------------------------------
# 1. The edge: parse and check a request, no model involved.


class RequestError(ValueError):
    """A bad request: the HTTP status, the offending field and what is wrong."""

    def __init__(self, status: int, field_name: str, message: str,
                 headers: dict[str, str] | None = None):
        super().__init__(f"{field_name}: {message}")
        self.status = status
        self.field = field_name
        self.message = message
        self.headers = headers or {}

    def payload(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": f"{self.field}: {self.message}", "type": kind,
                          "param": self.field, "code": self.status}}


@dataclass(frozen=True)
class Limits:
    """What one request may carry (``serve.max_*``)."""

    max_inputs: int = 64
    max_samples: int = 8
    max_request_bytes: int = 32 << 20
    max_image_bytes: int = 4 << 20
    max_image_pixels: int = 4 << 20
    # Pixels of every image and frame of one request together, read off the image headers
    # before any is decoded (what the processor's pixel tensors grow with).
    max_request_pixels: int = 64 << 20
    max_video_frames: int = 16
    max_text_chars: int = 16384


@dataclass(frozen=True)
class InputItem:
    """One input as sent: its text and the encoded bytes of its image and video frames."""

    text: str = ""
    image: tuple[bytes, str] | None = None  # (bytes, file extension)
    video: tuple[tuple[bytes, str], ...] = ()


@dataclass(frozen=True)
class EmbeddingRequest:
    inputs: tuple[InputItem, ...]
    mode: str = "disc"
    samples: int | None = None  # None: one greedy gen embedding; k: k sampled ones
    return_reasoning: bool = False
    encoding_format: str = "float"


def parse_request(body: bytes, limits: Limits, model_name: str) -> EmbeddingRequest:
    """The checked request, or ``RequestError`` naming the first bad field."""
    if len(body) > limits.max_request_bytes:
        raise RequestError(413, "body", f"{len(body)} bytes, over the limit of "
                           f"{limits.max_request_bytes}")
    try:
        payload = json.loads(body)
    except RecursionError:  # the C decoder stops at Python's recursion limit: a depth cap
        raise RequestError(400, "body", "JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError(400, "body", f"malformed JSON ({err})") from None
    if not isinstance(payload, dict):
        raise RequestError(400, "body", f"expected a JSON object, got {_kind(payload)}")
    unknown = sorted(set(payload) - {"model", "input", "mode", "samples", "return_reasoning",
                                     "encoding_format", "user"})
    if unknown:
        raise RequestError(400, _utf8(unknown[0]), "unknown field")
    _check_model(payload.get("model"), model_name)
    encoding = payload.get("encoding_format", "float")
    if encoding not in ENCODING_FORMATS:
        raise RequestError(400, "encoding_format", f"{_printable(encoding)} is not one of "
                           f"{', '.join(ENCODING_FORMATS)}")
    mode = payload.get("mode", "disc")
    if mode not in MODES:
        raise RequestError(400, "mode", f"{_printable(mode)} is not one of {', '.join(MODES)}")
    samples = _samples(payload.get("samples"), mode, limits)
    reasoning = payload.get("return_reasoning", False)
    if not isinstance(reasoning, bool):
        raise RequestError(400, "return_reasoning", f"expected true or false, got "
                           f"{_kind(reasoning)}")
    inputs = _inputs(payload.get("input"), limits)
    return EmbeddingRequest(inputs, mode, samples, reasoning, encoding)


def _utf8(text: str) -> str:
    """``text`` with lone surrogates escaped (the error JSON must encode as UTF-8)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _printable(value: Any) -> str:
    """``repr`` that is valid UTF-8 even for a lone surrogate (the error JSON must encode)."""
    return repr(value).encode("utf-8", "backslashreplace").decode("utf-8")


def _check_model(model: Any, served: str) -> None:
    if model is None:
        return
    if not isinstance(model, str):
        raise RequestError(400, "model", f"expected a string, got {_kind(model)}")
    if model != served:
        raise RequestError(404, "model", f"model {_printable(model)} is not served here (serving "
                           f"{served!r})")


def _samples(value: Any, mode: str, limits: Limits) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(400, "samples", f"expected an integer, got {_kind(value)}")
    if mode != "gen":
        raise RequestError(400, "samples", f"sampled embeddings need mode 'gen', not {mode!r}")
    if not 1 <= value <= limits.max_samples:
        raise RequestError(400, "samples", f"{value} is outside [1, {limits.max_samples}]")
    return value


def _inputs(value: Any, limits: Limits) -> tuple[InputItem, ...]:
    if value is None:
        raise RequestError(400, "input", "missing")
    if isinstance(value, (str, dict)):
        value = [value]
    if not isinstance(value, list):
        raise RequestError(400, "input", f"expected a string, an object or a list, got "
                           f"{_kind(value)}")
    if not value:
        raise RequestError(400, "input", "is empty")
    if len(value) > limits.max_inputs:
        raise RequestError(413, "input", f"{len(value)} items, over the limit of "
                           f"{limits.max_inputs}")
    # Two passes: every image's header is read (and the request's pixel budget checked)
    # before any image is decoded, so a request over the budget costs no decoding.
    budget = PixelBudget(limits.max_request_pixels)
    items = tuple(_item(v, f"input[{i}]", limits, budget) for i, v in enumerate(value))
    for where, data in budget.to_decode:
        _decode_check(data, where)
    return items


@dataclass
class PixelBudget:
    """The pixels a request's images hold so far, and the images still to decode."""

    limit: int
    used: int = 0
    to_decode: list[tuple[str, bytes]] = field(default_factory=list)

    def take(self, where: str, width: int, height: int, data: bytes) -> None:
        self.used += width * height
        if self.used > self.limit:
            raise RequestError(413, where, f"the request's images reach {self.used} pixels "
                               f"here, over the per-request limit of {self.limit} "
                               "(serve.max_request_pixels)")
        self.to_decode.append((where, data))


def _item(value: Any, where: str, limits: Limits, budget: PixelBudget) -> InputItem:
    if isinstance(value, str):
        value = {"text": value}
    if not isinstance(value, dict):
        raise RequestError(400, where, f"expected a string or an object, got {_kind(value)}")
    unknown = sorted(set(value) - {"text", "image", "video"})
    if unknown:
        raise RequestError(400, f"{where}.{_utf8(unknown[0])}", "unknown field (an input "
                           "has text, image and/or video)")
    text = value.get("text", "")
    if not isinstance(text, str):
        raise RequestError(400, f"{where}.text", f"expected a string, got {_kind(text)}")
    if len(text) > limits.max_text_chars:
        raise RequestError(413, f"{where}.text", f"{len(text)} characters, over the limit of "
                           f"{limits.max_text_chars}")
    _check_unicode(text, f"{where}.text")
    problem = control_token_problem(text)
    if problem:
        raise RequestError(400, f"{where}.text", problem)
    image = value.get("image")
    image_bytes = None
    if image is not None:
        data, ext, size = read_image(image, f"{where}.image", limits)
        budget.take(f"{where}.image", *size, data)
        image_bytes = (data, ext)
    video = _video(value.get("video"), f"{where}.video", limits, budget)
    if not text.strip() and image_bytes is None and not video:
        raise RequestError(400, where, "empty input: no text, image or video")
    return InputItem(text, image_bytes, video)


def _check_unicode(text: str, where: str) -> None:
    """JSON's \\ud800 escapes give strings no tokenizer takes (a lone surrogate failed the
    whole batch it was in)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RequestError(400, where, f"invalid Unicode at character {err.start} (a lone "
                           "surrogate)") from None


def _video(value: Any, where: str, limits: Limits,
           budget: PixelBudget) -> tuple[tuple[bytes, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        raise RequestError(400, where, "expected a non-empty list of frame data URLs")
    if len(value) > limits.max_video_frames:
        raise RequestError(413, where, f"{len(value)} frames, over the limit of "
                           f"{limits.max_video_frames}")
    frames, first_size = [], None
    for i, url in enumerate(value):
        data, ext, size = read_image(url, f"{where}[{i}]", limits)
        if first_size is not None and size != first_size:
            raise RequestError(400, f"{where}[{i}]", f"frame is {size[0]}x{size[1]} but frame 0 "
                               f"is {first_size[0]}x{first_size[1]} (a video's frames share "
                               "one size)")
        budget.take(f"{where}[{i}]", *size, data)
        first_size = size
        frames.append((data, ext))
    return tuple(frames)


def read_image(url: Any, where: str, limits: Limits) -> tuple[bytes, str, tuple[int, int]]:
    """A ``data:image/...;base64,`` URL -> (its bytes, a file extension, its size), from the
    header only: ``_decode_check`` decodes it once the whole request is within its limits."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise RequestError(400, where, "expected a data URL (data:image/png;base64,...); "
                           "paths and remote URLs are not accepted")
    header, sep, encoded = url.partition(",")
    if not sep or not header.endswith(";base64") or not header[5:].startswith("image/"):
        raise RequestError(400, where, "expected a base64 image data URL "
                           "(data:image/<type>;base64,<data>)")
    if len(encoded) * 3 // 4 > limits.max_image_bytes:
        raise RequestError(413, where, f"image over the limit of {limits.max_image_bytes} bytes")
    try:
        data = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(400, where, "the data URL's base64 payload is malformed") from None
    ext, size = _identify(data, where, limits)
    return data, ext, size


def _identify(data: bytes, where: str, limits: Limits) -> tuple[str, tuple[int, int]]:
    """Format and size from the header, with only the allowed formats' openers: any other
    format (EPS, whose decoder runs Ghostscript; TIFF; ...) never reaches its plugin."""
    try:
        with Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS)) as image:
            width, height = image.size
            image_format = image.format
    except Image.UnidentifiedImageError:
        other = _sniffed_format(data)
        if other:
            raise RequestError(415, where, f"image format {other} is not one of "
                               f"{', '.join(IMAGE_FORMATS)}") from None
        raise RequestError(400, where, "not a decodable image (no known image format)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise RequestError(400, where, f"not a decodable image ({err})") from None
    if width * height > limits.max_image_pixels:
        raise RequestError(413, where, f"image is {width}x{height} pixels, over the limit "
                           f"of {limits.max_image_pixels} pixels")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise RequestError(400, where, f"aspect ratio of {width}x{height} is over "
                           f"{MAX_ASPECT_RATIO}")
    return IMAGE_FORMATS[image_format], (width, height)


def _sniffed_format(data: bytes) -> str | None:
    """The other format whose magic bytes ``data`` starts with: Pillow's accept checks
    only, which look at the prefix and run no decoder."""
    Image.init()
    prefix = data[:16]
    for name, (_, accept) in Image.OPEN.items():
        if name not in IMAGE_FORMATS and accept is not None:
            try:
                if accept(prefix):
                    return name
            except Exception:  # an accept check that wants more bytes: not this format
                continue
    return None


def _decode_check(data: bytes, where: str) -> None:
    """Decode once at the edge, so that a truncated file is this request's 400, not a failed
    batch."""
    try:
        with Image.open(io.BytesIO(data), formats=list(IMAGE_FORMATS)) as image:
            image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise RequestError(400, where, f"not a decodable image ({err})") from None


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def materialise(item: InputItem, directory: Path, index: int) -> Side:
    """The item as a ``Side`` whose media are files this process wrote into ``directory``."""
    def write(data: bytes, ext: str, name: str) -> str:
        path = directory / f"{index}-{name}.{ext}"
        path.write_bytes(data)
        return str(path)

    images = (write(*item.image, "image"),) if item.image else ()
    video = tuple(write(data, ext, f"frame{i}") for i, (data, ext) in enumerate(item.video))
    return Side(text=item.text, images=images, video=video)


# ---------------------------------------------------------------------------------------------
# 2. The model work (no Ray, no HTTP).


@dataclass(frozen=True)
class Autoscaling:
    """``serve.autoscaling``: Ray Serve's autoscaler between min and max replicas."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 16.0

    def ray_config(self) -> dict[str, Any]:
        return {"min_replicas": self.min_replicas, "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests}


@dataclass(frozen=True)
class ServeOptions:
    """The ``serve:`` recipe section, as plain values (it travels to every replica)."""

    host: str = "127.0.0.1"
    port: int = 8000
    direct_port: int | None = 8100
    num_replicas: int = 1
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    engine: str = "auto"
    gpu_memory_utilization: float = 0.5
    model_name: str | None = None
    disc_batch_size: int = 32
    disc_batch_wait_s: float = 0.01
    gen_batch_size: int = 8
    gen_batch_wait_s: float = 0.05
    max_ongoing_requests: int = 64
    max_queued_requests: int = 256
    request_timeout_s: float = 300.0
    body_timeout_s: float = 30.0
    health_check_period_s: float = 10.0
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 50
    dtype: str = "float32"
    limits: Limits = field(default_factory=Limits)
    # SHA-256 of the API key (hex), never the key: the key stays in the environment that
    # started the service, and what travels to the replicas (or into a printed config) is this.
    api_key_sha256: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    autoscaling: Autoscaling | None = None

    @classmethod
    def from_config(cls, cfg: DictConfig) -> ServeOptions:
        s = cfg.serve
        limits = Limits(**{k: int(s[k]) for k in Limits.__dataclass_fields__})
        special = ("limits", "dtype", "api_key_sha256", "autoscaling")
        plain = {k: s[k] for k in cls.__dataclass_fields__ if k not in special}
        scaling = s.autoscaling
        autoscaling = None if not scaling.enabled else Autoscaling(
            int(scaling.min_replicas), int(scaling.max_replicas),
            float(scaling.target_ongoing_requests))
        return cls(**plain, dtype=str(cfg.model.dtype), limits=limits,
                   api_key_sha256=key_digest(os.environ.get(str(s.api_key_env), "")),
                   autoscaling=autoscaling)

    @property
    def resolved_engine(self) -> str:
        return engine_for(self.engine, self.gpus_per_replica)

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_certfile else "http"


def key_digest(key: str) -> str | None:
    """The hex SHA-256 of an API key; None for no key (the service is then open)."""
    return hashlib.sha256(key.encode()).hexdigest() if key else None


@dataclass
class GenResult:
    embeddings: np.ndarray  # [k, hidden]
    completions: list[str]  # [k]


@dataclass
class DiscResult:
    embedding: np.ndarray | None  # [hidden]; None: the prompt is over ``Embedder.prompt_room``
    prompt_tokens: int


class Embedder:
    """One model and its rollout engine; disc and gen embeddings of sides, batched."""

    def __init__(self, checkpoint: str, options: ServeOptions):
        import torch

        from umerl.model.loading import context_length, load_policy

        device = "cuda" if options.gpus_per_replica > 0 and torch.cuda.is_available() else "cpu"
        self.options = options
        self.bundle = load_policy(checkpoint, dtype=options.dtype, device=device)
        self.engine = self._engine(checkpoint, options)
        self.context_length = context_length(checkpoint)

    def _engine(self, checkpoint: str, options: ServeOptions) -> Any:
        if options.resolved_engine == "vllm":
            from rollout.vllm_engine import VllmEngine

            return VllmEngine(checkpoint, dtype=options.dtype,
                              gpu_memory_utilization=options.gpu_memory_utilization)
        from rollout.transformers_engine import TransformersEngine

        return TransformersEngine(self.bundle, batch_size=options.gen_batch_size)

    @property
    def prompt_room(self) -> int:
        """The longest prompt served: the context less the generation budget."""
        return self.context_length - self.options.max_new_tokens

    def prompt_tokens(self, side: Side) -> int:
        return self.bundle.encoder.prompt_length(side)

    def disc(self, sides: Sequence[Side]) -> list[DiscResult]:
        """Disc embeddings (as ``umerl.model.embed.disc_embeddings``: one encoding, one
        forward pass)
        with each prompt's length read off that encoding; a prompt over ``prompt_room`` gets no
        embedding and stays out of the forward pass."""
        from umerl.model.embed import forward_embeddings

        prompts = [self.bundle.encoder.encode(side) for side in sides]
        fits = [i for i, p in enumerate(prompts) if len(p.input_ids) <= self.prompt_room]
        vectors = {}
        if fits:
            disc = forward_embeddings(self.bundle, [prompts[i] for i in fits])[0].numpy()
            vectors = dict(zip(fits, disc))
        return [DiscResult(vectors.get(i), len(p.input_ids)) for i, p in enumerate(prompts)]

    def gen(self, sides: Sequence[Side], samples: int | None,
            max_new_tokens: int | None = None) -> list[GenResult]:
        """Greedy (``samples`` None, as ``umerl eval``) or ``samples`` sampled embeddings;
        ``max_new_tokens`` (default ``serve.max_new_tokens``) shortens the health check's."""
        from umerl.model.embed import gen_embeddings
        from umerl.model.sampling import SamplingParams

        o = self.options
        budget = o.max_new_tokens if max_new_tokens is None else max_new_tokens
        if samples is None:
            sampling = SamplingParams(max_new_tokens=budget, do_sample=False)
        else:
            sampling = SamplingParams(max_new_tokens=budget,
                                      temperature=o.temperature, top_k=o.top_k)
        out = gen_embeddings(self.bundle, self.engine, sides, samples or 1, sampling,
                             batch_size=max(1, len(sides) * (samples or 1)))
        return [GenResult(out.embeddings[i].numpy(), out.completions[i])
                for i in range(len(sides))]


# ---------------------------------------------------------------------------------------------
# 3. The Serve deployment.

Item = TypeVar("Item")
Result = TypeVar("Result")


class Batcher(Generic[Item, Result]):
    """Dynamic batching of one path: each call waits in a queue, and whenever the previous
    batch is done the next one is what waits (at most ``max_size``), once it is full or
    ``wait_s`` after its first call arrived.

    Not ``serve.batch``: Ray Serve 2.60's batcher forms the next batch as soon as its wait is
    over, while the previous batch still runs, and the formed batches then queue for their turn;
    under load they stay small (measured: 2.2 inputs per batch with 8 in flight and a batch size
    of 8). Here a batch forms when it can run, so whatever arrived meanwhile runs together.
    """

    def __init__(self, run: Callable[[list[Item]], Awaitable[list[Result]]], max_size: int,
                 wait_s: float):
        self.run, self.max_size, self.wait_s = run, max_size, wait_s
        self._waiting: list[tuple[Item, float, asyncio.Future]] = []  # (item, arrival, future)
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        # Done when the batch now running (or the last one) ends: media of a caller that
        # disconnected stay until then (the batch may still read them).
        self.running: asyncio.Future | None = None

    @property
    def queued(self) -> int:
        return len(self._waiting)

    async def __call__(self, item: Item) -> Result:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():  # the loop that serves the requests
            self._arrived = asyncio.Event()
            self._worker = loop.create_task(self._serve())
        future = loop.create_future()
        self._waiting.append((item, loop.time(), future))
        self._arrived.set()
        return await future

    async def _serve(self) -> None:
        while True:
            await self._run_batch(await self._next_batch())

    async def _next_batch(self) -> list[tuple[Item, asyncio.Future]]:
        loop = asyncio.get_running_loop()
        while not self._waiting:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = self._waiting[0][1] + self.wait_s
        while len(self._waiting) < self.max_size and loop.time() < deadline:
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), deadline - loop.time())
            except TimeoutError:
                break
        batch, self._waiting = self._waiting[:self.max_size], self._waiting[self.max_size:]
        return [(item, future) for item, _, future in batch if not future.done()]

    async def _run_batch(self, batch: list[tuple[Item, asyncio.Future]]) -> None:
        if not batch:  # every caller gave up (disconnected) while waiting
            return
        self.running = asyncio.get_running_loop().create_future()
        try:
            try:
                results = await self.run([item for item, _ in batch])
            except Exception as err:  # retried per input: only the input at fault fails
                results = await self._one_by_one(batch, err)
            for (_, future), result in zip(batch, results):
                if future.done():  # its caller disconnected meanwhile
                    continue
                if isinstance(result, Exception):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        finally:
            self.running.set_result(None)

    async def _one_by_one(self, batch: list[tuple[Item, asyncio.Future]],
                          err: Exception) -> list[Any]:
        """A failed batch's inputs, each alone. When some succeed, the ones that fail alone
        are at fault (``InputFailed``); when none does, the fault is the server's and every
        caller gets the batch's error."""
        if len(batch) == 1:
            return [err]
        results: list[Any] = []
        for item, future in batch:
            if future.done():
                results.append(None)
                continue
            try:
                results.append((await self.run([item]))[0])
            except Exception as alone:
                results.append(alone)
        live = [r for (_, f), r in zip(batch, results) if not f.done()]
        if live and all(isinstance(r, Exception) for r in live):
            return [err] * len(batch)
        return [InputFailed(r) if isinstance(r, Exception) else r for r in results]


class InputFailed(Exception):
    """An input that failed alone in the model while the rest of its batch succeeded."""

    def __init__(self, cause: Exception):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.cause = cause


def encode_embedding(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """One embedding as JSON: a list of floats, or (``base64``) its float32 little-endian bytes
    in base64, as OpenAI's API sends them: a quarter of the text, and no float printing."""
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector.tolist()


@dataclass(frozen=True)
class GenJob:
    side: Side
    samples: int | None
    max_new_tokens: int | None = None  # None: serve.max_new_tokens (the health check's is less)


@dataclass(frozen=True)
class ItemAnswer:
    """One input's response item and what it cost."""

    body: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int


class ServeMetrics:
    """Prometheus metrics through Ray's metrics agent (``ray.util.metrics``; Ray exports them
    on each node's metrics port). Nothing is recorded outside a Ray worker."""

    def __init__(self) -> None:
        import ray

        self.enabled = ray.is_initialized()
        if not self.enabled:
            return
        from ray.util import metrics

        self.requests = metrics.Counter(
            "umerl_serve_requests", "Embedding requests answered, by mode and HTTP status.",
            tag_keys=("mode", "status"))
        self.latency = metrics.Histogram(
            "umerl_serve_latency_s", "Seconds from request to response, by mode.",
            boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120],
            tag_keys=("mode",))
        self.batch_size = metrics.Histogram(
            "umerl_serve_batch_size", "Inputs per model batch, by path (disc, gen).",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128], tag_keys=("path",))
        self.queue_depth = metrics.Gauge(
            "umerl_serve_queue_depth", "Inputs waiting for a batch, by path.",
            tag_keys=("path",))
        self.in_flight = metrics.Gauge(
            "umerl_serve_requests_in_flight", "Embedding requests this replica holds.")

    def answered(self, mode: str, status: int, seconds: float) -> None:
        if self.enabled:
            self.requests.inc(tags={"mode": mode, "status": str(status)})
            self.latency.observe(seconds, tags={"mode": mode})

    def batch(self, path: str, size: int, queued: int, in_flight: int) -> None:
        if self.enabled:
            self.batch_size.observe(size, tags={"path": path})
            self.queue_depth.set(queued, tags={"path": path})
            self.in_flight.set(in_flight)


HEALTH_SIDE = Side(text="health check")
HEALTH_NEW_TOKENS = 2  # the health check's gen step: enough to run generate and re-encode
RETRY_AFTER_S = 1
CLIENT_GONE = 499  # nginx's "client closed request", as Ray Serve counts a disconnect


class EmbeddingService:
    """One replica: a model, a disc batcher, a gen batcher and the HTTP routes."""

    def __init__(self, checkpoint: str, options: ServeOptions, router: Router | None):
        use_reserved_cpus(options.cpus_per_replica)
        # Every Pillow plugin imported now: the first image in a format not allowed would
        # otherwise import them all (``_sniffed_format``), 0.15 s of CPU on the event loop
        # that every request in flight waits out.
        Image.init()
        self.options = options
        self.embedder = Embedder(checkpoint, options)
        self.model_name = options.model_name or Path(checkpoint).name
        if router is not None and router.hidden_size != self.embedder.bundle.hidden_size:
            raise ValueError(f"the router was fitted on {router.hidden_size}-d disc embeddings; "
                             f"this model's are {self.embedder.bundle.hidden_size}-d")
        self.router = router
        self.media_root = Path(tempfile.mkdtemp(prefix="umerl-serve-"))
        # Batches run and inputs embedded per path, and the largest batch: /health shows them.
        self.stats = {f"{path}_{what}": 0 for path in ("disc", "gen")
                      for what in ("batches", "inputs", "largest_batch")}
        self.disc_batcher = Batcher(self._disc_batch, options.disc_batch_size,
                                    options.disc_batch_wait_s)
        self.gen_batcher = Batcher(self._gen_batch, options.gen_batch_size,
                                   options.gen_batch_wait_s)
        self.in_flight = 0  # embedding requests held (reading, waiting or embedding)
        self.health: dict[str, Any] = {"state": "starting", "checked_at": None}
        self.metrics = ServeMetrics()
        self._cleanups: set[asyncio.Task] = set()

    async def check_health(self) -> None:
        """Ray Serve calls this every ``health_check_period_s``; a raise marks the replica
        unhealthy, and Ray replaces it. A tiny disc forward and a gen step of
        ``HEALTH_NEW_TOKENS`` tokens, each through its batcher (so they queue behind real
        batches rather than racing them), prove both paths answer."""
        try:
            disc = await self.disc_batcher(HEALTH_SIDE)
            gen = await self.gen_batcher(GenJob(HEALTH_SIDE, None, HEALTH_NEW_TOKENS))
            for name, vector in (("disc", disc.embedding), ("gen", gen.embeddings[0])):
                if vector is None or not np.isfinite(vector).all():
                    raise RuntimeError(f"the health-check {name} embedding is missing or "
                                       "not finite")
        except Exception as err:
            self.health = {"state": "unhealthy", "checked_at": time.time(),
                           "error": type(err).__name__}
            logger.error("health check failed: %r", err)
            raise
        self.health = {"state": "healthy", "checked_at": time.time()}

    async def __call__(self, request: Any) -> Any:
        from starlette.requests import ClientDisconnect
        from starlette.responses import JSONResponse, Response

        request_id = _request_id()
        started, mode, status = time.monotonic(), "none", 500
        try:
            body, mode = await self._route(request)
            status = 503 if body.get("status") == "unhealthy" else 200
            return JSONResponse(body, status_code=status)
        except RequestError as err:
            status = err.status
            return JSONResponse(err.payload(), status_code=err.status, headers=err.headers)
        except ClientDisconnect:  # the caller left before its body was read: nobody to answer
            # Not a server fault: no traceback in the log (a client that connects, sends and
            # leaves in a loop wrote 23 log lines per request, and counted as a 500).
            status = CLIENT_GONE
            return Response(status_code=CLIENT_GONE)
        except Exception:  # a bug or a failed batch: this request fails, not the replica
            # The details (a message may name a server path) go to the log, under the id the
            # client gets.
            logger.exception("request %s failed", request_id)
            return JSONResponse({"error": {
                "message": f"internal error; the server log has the details under request id "
                           f"{request_id}", "type": "server_error", "param": None, "code": 500,
                "request_id": request_id}}, status_code=500)
        finally:
            self.metrics.answered(mode, status, time.monotonic() - started)

    def _authorised(self, request: Any) -> bool:
        expected = self.options.api_key_sha256
        if expected is None:
            return True
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            hashlib.sha256(key.strip().encode()).hexdigest(), expected)

    async def _route(self, request: Any) -> tuple[dict[str, Any], str]:
        path, method = request.scope["path"].rstrip("/") or "/", request.method
        routes = {"/health": "GET", "/v1/models": "GET", "/v1/embeddings": "POST"}
        if path == "/health":  # open: load balancers and Ray's probes have no key
            if method != "GET":
                raise RequestError(405, "method", f"{path} takes GET, not {method}")
            return self._health(), "none"
        if not self._authorised(request):
            raise RequestError(401, "authorization", "missing or wrong API key (send "
                               "Authorization: Bearer <key>)",
                               headers={"WWW-Authenticate": "Bearer"})
        if path not in routes:
            raise RequestError(404, "path", f"no route {path}; routes: {', '.join(routes)}")
        if method != routes[path]:
            raise RequestError(405, "method", f"{path} takes {routes[path]}, not {method}")
        if path == "/v1/models":
            return await self._models(), "none"
        content_type = request.headers.get("content-type", "")
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise RequestError(415, "content-type", f"expected application/json, got "
                               f"{content_type or 'none'}")
        if self.in_flight >= self.options.max_queued_requests:
            raise RequestError(503, "server", f"busy: {self.in_flight} requests in progress "
                               f"on this replica (serve.max_queued_requests); retry later",
                               headers={"Retry-After": str(RETRY_AFTER_S)})
        self.in_flight += 1
        holder: dict[str, str] = {"mode": "none"}
        try:
            # asyncio.timeout, not wait_for: wait_for (Python < 3.12) drops a cancel that
            # lands when its awaitable is already done, and Serve's cancel of a client that
            # sent its body and left comes right behind that body (such requests were all
            # embedded on the direct port). It also runs in this task: no task per request.
            async with asyncio.timeout(self.options.request_timeout_s):
                return await self._embeddings(request, holder), holder["mode"]
        except TimeoutError:
            raise RequestError(504, "server", f"not answered within "
                               f"{self.options.request_timeout_s:g} s "
                               "(serve.request_timeout_s)") from None
        finally:
            self.in_flight -= 1

    async def _embeddings(self, request: Any, holder: dict[str, str]) -> dict[str, Any]:
        body = await self._read_body(request)
        if len(body) <= INLINE_PARSE_BYTES:
            parsed = parse_request(body, self.options.limits, self.model_name)
        else:  # decoding a large body's images would hold up every other request
            parsed = await asyncio.to_thread(parse_request, body, self.options.limits,
                                             self.model_name)
        holder["mode"] = parsed.mode
        return await self.embed(parsed)

    async def _read_body(self, request: Any) -> bytes:
        """The body, read chunk by chunk: past ``max_request_bytes`` a 413 (a chunked upload
        declares no length), and a 408 when it has not all arrived within ``body_timeout_s``."""
        limit = self.options.limits.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, "body", f"{declared} bytes, over the limit of {limit}")
        chunks, size = [], 0
        try:  # one deadline for the whole body, in this task (see _route on wait_for)
            async with asyncio.timeout(self.options.body_timeout_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise RequestError(413, "body", f"over the limit of {limit} bytes")
                    chunks.append(chunk)
        except TimeoutError:
            raise RequestError(408, "body", f"not received within "
                               f"{self.options.body_timeout_s:g} s "
                               "(serve.body_timeout_s)") from None
        return b"".join(chunks)

    def _health(self) -> dict[str, Any]:
        """This replica's state: the last health check (Ray's, every
        ``health_check_period_s``), its load and its batch counts."""
        state = self.health["state"]
        return {"status": "unhealthy" if state == "unhealthy" else "ok",
                "replica": _replica_id(), "health": dict(self.health), "model": self.model_name,
                "router": self.router is not None, "in_flight": self.in_flight,
                "queued": {"disc": self.disc_batcher.queued, "gen": self.gen_batcher.queued},
                "stats": dict(self.stats)}

    async def _models(self) -> dict[str, Any]:
        """The model, and the live replicas' direct URLs (``direct_urls``): a client whose
        direct URL went stale (its replica restarted on another port) re-reads them here."""
        modes = ["disc", "gen"] + (["auto"] if self.router is not None else [])
        try:  # a blocking controller call: off the event loop
            direct = list(await asyncio.to_thread(live_direct_urls, self.options))
        except Exception as err:  # no controller (in-process use): no URLs, still the model
            logger.warning("direct URLs not read from the Serve controller: %r", err)
            direct = []
        return {"object": "list", "direct_urls": direct, "data": [{
            "id": self.model_name, "object": "model", "owned_by": "umerl", "modes": modes,
            "dimensions": self.embedder.bundle.hidden_size,
            "max_new_tokens": self.options.max_new_tokens,
        }]}

    async def embed(self, request: EmbeddingRequest) -> dict[str, Any]:
        """The response body for a checked request (OpenAI's embeddings shape plus modes)."""
        if request.mode == "auto" and self.router is None:
            raise RequestError(400, "mode", "'auto' needs a router: start the service with "
                               "`umerl serve CHECKPOINT --router ROUTER`")
        folder = Path(tempfile.mkdtemp(dir=self.media_root))
        try:
            sides = [materialise(item, folder, i) for i, item in enumerate(request.inputs)]
            # Mode gen checks prompt lengths before generating; disc and auto read them off the
            # encoding of their disc batch, before its forward pass (one tokenisation, not two).
            lengths = [self._checked_length(self.embedder.prompt_tokens(side), i)
                       if request.mode == "gen" else 0 for i, side in enumerate(sides)]
            done = await asyncio.gather(
                *(self._embed_one(side, i, lengths[i], request) for i, side in enumerate(sides)),
                return_exceptions=True)
        finally:
            self._release(folder)
        failed = [(i, d) for i, d in enumerate(done) if isinstance(d, BaseException)]
        for index, error in failed:
            if isinstance(error, InputFailed):  # the model failed on this input alone
                logger.error("input[%d] failed alone in its batch: %r", index, error.cause)
                raise RequestError(422, f"input[{index}]", "this input could not be embedded "
                                   "(the other inputs of its batch could)")
        if failed:
            raise failed[0][1]
        prompt_tokens = sum(answer.prompt_tokens for answer in done)
        completion_tokens = sum(answer.completion_tokens for answer in done)
        data = [{"object": "embedding", "index": i, **answer.body} for i, answer in enumerate(done)]
        return {
            "object": "list", "model": self.model_name, "data": data,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }

    def _release(self, folder: Path) -> None:
        """Remove a request's media folder, at once or, when its caller left (disconnect or
        timeout) while a batch may hold its inputs, once the running batches end: they may
        still read the files (gen re-reads images after generating)."""
        running = [b.running for b in (self.disc_batcher, self.gen_batcher)
                   if b.running is not None and not b.running.done()]
        if not running:
            shutil.rmtree(folder, ignore_errors=True)
            return

        async def later() -> None:
            await asyncio.wait(running)
            shutil.rmtree(folder, ignore_errors=True)

        task = asyncio.get_running_loop().create_task(later())
        self._cleanups.add(task)  # a reference, so the task is not collected midway
        task.add_done_callback(self._cleanups.discard)

    def _checked_length(self, tokens: int, index: int) -> int:
        room = self.embedder.prompt_room
        if tokens > room:
            raise RequestError(413, f"input[{index}]", f"prompt is {tokens} tokens; at most "
                               f"{room} fit (context {self.embedder.context_length} minus "
                               f"max_new_tokens {self.options.max_new_tokens})")
        return tokens

    async def _embed_one(self, side: Side, index: int, prompt_tokens: int,
                         request: EmbeddingRequest) -> ItemAnswer:
        if request.mode in ("disc", "auto"):
            disc = await self.disc_batcher(side)
            prompt_tokens = self._checked_length(disc.prompt_tokens, index)
            if request.mode == "disc" or not self.router.route([side], disc.embedding[None])[0]:
                body = {"embedding": encode_embedding(disc.embedding, request.encoding_format),
                        "mode": "disc"}
                if request.return_reasoning:
                    body["reasoning"] = None  # the disc path writes none
                return ItemAnswer(body, prompt_tokens, 0)
        gen = await self.gen_batcher(GenJob(side, request.samples))
        return ItemAnswer(_gen_body(gen, request), prompt_tokens,
                          self._count_tokens(gen.completions))

    def _count_tokens(self, completions: list[str]) -> int:
        # Re-tokenised decoded text: the decoder drops <|im_end|>, so this may be 1 short.
        tokenizer = self.embedder.bundle.tokenizer
        return sum(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions)

    def _count(self, path: str, size: int) -> None:
        self.stats[f"{path}_batches"] += 1
        self.stats[f"{path}_inputs"] += size
        self.stats[f"{path}_largest_batch"] = max(self.stats[f"{path}_largest_batch"], size)

    async def _disc_batch(self, sides: list[Side]) -> list[DiscResult]:
        self._count("disc", len(sides))
        self.metrics.batch("disc", len(sides), self.disc_batcher.queued, self.in_flight)
        return await asyncio.to_thread(self.embedder.disc, sides)

    async def _gen_batch(self, jobs: list[GenJob]) -> list[GenResult]:
        """One generate call per distinct ``samples`` and token budget in the batch (usually
        one)."""
        self._count("gen", len(jobs))
        self.metrics.batch("gen", len(jobs), self.gen_batcher.queued, self.in_flight)
        results: dict[int, GenResult] = {}
        for samples, budget in dict.fromkeys((job.samples, job.max_new_tokens) for job in jobs):
            chosen = [i for i, job in enumerate(jobs)
                      if (job.samples, job.max_new_tokens) == (samples, budget)]
            out = await asyncio.to_thread(self.embedder.gen, [jobs[i].side for i in chosen],
                                          samples, budget)
            results.update(zip(chosen, out))
        return [results[i] for i in range(len(jobs))]


def _request_id() -> str:
    """Ray Serve's id of the request being served (it also sends it as X-Request-Id), or a
    fresh one outside Serve."""
    try:
        from ray.serve.context import _get_serve_request_context

        found = _get_serve_request_context().request_id
    except Exception:  # no Serve request context (in-process use)
        found = ""
    return found or uuid.uuid4().hex


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # not inside a Serve replica
        return "local"


def _gen_body(gen: GenResult, request: EmbeddingRequest) -> dict[str, Any]:
    """``embedding`` is the greedy one, or with ``samples`` the first of the k in ``samples``
    (so the item keeps OpenAI's shape); ``reasoning`` the completion text(s)."""
    sampled = request.samples is not None
    encoding = request.encoding_format
    body: dict[str, Any] = {"embedding": encode_embedding(gen.embeddings[0], encoding),
                            "mode": "gen"}
    if sampled:
        body["samples"] = [encode_embedding(e, encoding) for e in gen.embeddings]
    if request.return_reasoning:
        body["reasoning"] = gen.completions if sampled else gen.completions[0]
    return body


# Ray Serve runs a replica's request code on an event loop of its own thread by default; each
# request then hops between two loops, and the threads contend for the replica's GIL with the
# model. Every await in this module's request path yields (the model runs in a worker
# thread), so the replica's main loop can run it.
REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}
# Likewise the HTTP proxy (the controller starts it, and it inherits the controller's
# environment) routes each request on its own loop rather than on a router loop in another
# thread.
CONTROLLER_ENV = {"RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}
# Ray Serve 2.60's direct ingress: the controller hands each replica of the ingress deployment
# a port from [MIN, MAX] and the replica serves HTTP on it itself (the proxy keeps serving
# too). On Ctrl-C a direct replica first stays up for the draining period, meant for an outside
# load balancer to drop it (default 30 s); nothing here balances over replica ports.
DIRECT_DRAIN_S = "2"


@dataclass(frozen=True)
class ServiceUrls:
    """Where the service answers: Serve's proxy (over every replica) and, with
    ``serve.direct_port``, each replica's own HTTP server."""

    proxy: str
    direct: tuple[str, ...] = ()


def serve_env(options: ServeOptions) -> tuple[dict[str, str], dict[str, str]]:
    """The environment of the replicas and of the controller (and its proxy)."""
    replica, controller = dict(REPLICA_ENV), dict(CONTROLLER_ENV)
    if options.direct_port is not None:
        direct = {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
                  "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": DIRECT_DRAIN_S}
        replica.update(direct)
        controller.update(direct, RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=str(options.direct_port),
                          RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=str(
                              options.direct_port + DIRECT_PORT_SPAN - 1))
    return replica, controller


def deployment_options(options: ServeOptions) -> dict[str, Any]:
    """``EmbeddingService``'s Ray Serve deployment options (the same in ``build_app`` and in a
    printed config)."""
    replica_env, _ = serve_env(options)
    scaling: dict[str, Any] = (
        {"num_replicas": options.num_replicas} if options.autoscaling is None
        else {"autoscaling_config": options.autoscaling.ray_config()})
    return {
        **scaling, "max_ongoing_requests": options.max_ongoing_requests,
        # Past this many requests waiting at the proxy for a replica, Serve answers 503 itself.
        "max_queued_requests": options.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": RETRY_AFTER_S},
        "health_check_period_s": options.health_check_period_s,
        "ray_actor_options": {"num_cpus": options.cpus_per_replica,
                              "num_gpus": options.gpus_per_replica,
                              "runtime_env": {"env_vars": replica_env}},
    }


def build_app(checkpoint: str, options: ServeOptions, router: Router | None) -> Any:
    """The Serve application: replicas of ``EmbeddingService`` (``num_replicas``, or
    between ``serve.autoscaling``'s bounds)."""
    deployment = serve.deployment(EmbeddingService, name="EmbeddingService").options(
        **deployment_options(options))
    return deployment.bind(str(checkpoint), options, router)


def app(args: dict[str, Any]) -> Any:
    """The application builder a Serve config names (``umerl.serve.service:app``, written by
    ``umerl serve CHECKPOINT --print-config``): ``checkpoint``, optional ``router`` and
    ``overrides`` (recipe ``key=value``s) and ``api_key_sha256``."""
    from umerl.config.recipe import load_recipe

    cfg = load_recipe(None, [str(o) for o in args.get("overrides", [])])
    options = ServeOptions.from_config(cfg)
    if args.get("api_key_sha256"):
        options = dataclasses.replace(options, api_key_sha256=str(args["api_key_sha256"]))
    router = Router.load(args["router"]) if args.get("router") else None
    return build_app(str(args["checkpoint"]), options, router)


def http_options(options: ServeOptions) -> dict[str, Any]:
    """Serve's HTTP options: the proxy and the replicas' own servers share them (TLS too).
    The proxy's timeout is a backstop past the replica's own 504."""
    http: dict[str, Any] = {"host": options.host, "port": options.port,
                            "request_timeout_s": options.request_timeout_s + 30}
    if options.ssl_certfile:
        http |= {"ssl_certfile": options.ssl_certfile, "ssl_keyfile": options.ssl_keyfile}
    return http


def serve_config(checkpoint: str, cfg: DictConfig, router_path: str | None,
                 overrides: Sequence[str]) -> dict[str, Any]:
    """A Serve config file (``serve deploy``) for this checkpoint and recipe. The application
    builder re-reads the recipe from ``overrides`` on the cluster, so the config carries them,
    not the resolved values; the deployment options are written out for reading and editing
    (Serve applies a config's deployment options over the code's)."""
    options = ServeOptions.from_config(cfg)
    args: dict[str, Any] = {"checkpoint": str(Path(checkpoint).resolve()),
                            "overrides": list(overrides)}
    if router_path:
        args["router"] = str(Path(router_path).resolve())
    if options.api_key_sha256:
        args["api_key_sha256"] = options.api_key_sha256
    deployment = {"name": "EmbeddingService", **deployment_options(options)}
    return {
        "proxy_location": "EveryNode",
        "http_options": http_options(options),
        "logging_config": {"enable_access_log": False},
        "applications": [{"name": APP_NAME, "route_prefix": "/",
                          "import_path": "umerl.serve.service:app", "args": args,
                          "deployments": [deployment]}],
    }


def start_service(checkpoint: str, options: ServeOptions, router: Router | None) -> ServiceUrls:
    """Start Serve's HTTP proxy on ``host:port``, deploy the application and wait for the
    replicas' own servers (with ``direct_port``). Ray must already be initialised
    (``umerl.runtime.ray_start.init_ray``)."""
    _, controller_env = serve_env(options)
    serve.start(http_options=http_options(options),
                controller_options={"runtime_env": {"env_vars": controller_env}})
    # No access log: a line per request through Ray's log pipeline costs the replica CPU.
    serve.run(build_app(checkpoint, options, router), name=APP_NAME, route_prefix="/",
              logging_config={"enable_access_log": False})
    proxy = f"{options.scheme}://{options.host}:{options.port}"
    if options.direct_port is None:
        return ServiceUrls(proxy)
    return ServiceUrls(proxy, _direct_urls(options))


def direct_urls_from(details: dict[str, Any], options: ServeOptions) -> tuple[str, ...]:
    """The replicas' own servers in the controller's serve details (its target groups, what
    Serve's status and dashboard report), sorted by port."""
    if options.direct_port is None:
        return ()
    first, last = options.direct_port, options.direct_port + DIRECT_PORT_SPAN - 1
    targets = sorted(
        (target["port"], target["ip"])
        for group in details.get("target_groups", [])
        if group.get("app_name") == APP_NAME and group.get("protocol") == "HTTP"
        for target in group["targets"] if first <= target["port"] <= last)
    # A replica listens on serve.host of its own node: name that node when host is a wildcard.
    wildcard = options.host in ("0.0.0.0", "::")
    return tuple(f"{options.scheme}://{ip if wildcard else options.host}:{port}"
                 for port, ip in targets)


def live_direct_urls(options: ServeOptions) -> tuple[str, ...]:
    """The direct URLs of the replicas alive now (a restarted replica gets a new port); none
    without ``serve.direct_port`` or outside Ray."""
    import ray

    if options.direct_port is None or not ray.is_initialized():  # Serve would start a Ray
        return ()
    from ray.serve.context import _get_global_client

    return direct_urls_from(_get_global_client().get_serve_details(), options)


def _direct_urls(options: ServeOptions, timeout_s: float = 30.0) -> tuple[str, ...]:
    """Every replica's direct URL, waited for (the controller records a replica's port on its
    next reconcile)."""
    deadline = time.monotonic() + timeout_s
    while True:
        urls = live_direct_urls(options)
        if len(urls) >= options.num_replicas or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if len(urls) < options.num_replicas:
        raise RuntimeError(f"{len(urls)} of {options.num_replicas} replicas report a direct "
                           f"port in {options.direct_port}.."
                           f"{options.direct_port + DIRECT_PORT_SPAN - 1} after "
                           f"{timeout_s:.0f} s (serve.direct_port)")
    return urls


def run_service(checkpoint: str, cfg: DictConfig, router_path: str | None) -> None:
    """``umerl serve``: Ray (local on 127.0.0.1 unless ``ray.address``), the application, and a
    wait until Ctrl-C, which shuts Serve down."""
    from umerl.runtime.ray_start import init_ray

    router = Router.load(router_path) if router_path else None
    options = ServeOptions.from_config(cfg)
    init_ray(cfg)
    urls = start_service(checkpoint, options, router)
    modes = "disc, gen" + (", auto" if router else " (auto needs --router)")
    print(f"[serve] {checkpoint} at {urls.proxy}/v1/embeddings ({options.num_replicas} "
          f"replica(s), {options.resolved_engine} generation; modes {modes}); Ctrl-C stops",
          flush=True)
    key_env = str(cfg.serve.api_key_env)
    print(f"[serve] API key: required (Authorization: Bearer ${key_env})" if
          options.api_key_sha256 else f"[serve] API key: none (${key_env} unset): anyone who "
          f"reaches {options.host} can call it", flush=True)
    for i, url in enumerate(urls.direct):
        print(f"[serve] replica {i} directly (no proxy hop): {url}/v1/embeddings", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("[serve] shutting down", flush=True)
    finally:
        serve.shutdown()

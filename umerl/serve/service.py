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
import io
import json
import logging
import tempfile
import time
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

    def __init__(self, status: int, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.status = status
        self.field = field_name
        self.message = message

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
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError(400, "body", f"malformed JSON ({err})") from None
    if not isinstance(payload, dict):
        raise RequestError(400, "body", f"expected a JSON object, got {_kind(payload)}")
    unknown = sorted(set(payload) - {"model", "input", "mode", "samples", "return_reasoning",
                                     "encoding_format", "user"})
    if unknown:
        raise RequestError(400, unknown[0], "unknown field")
    _check_model(payload.get("model"), model_name)
    encoding = payload.get("encoding_format", "float")
    if encoding not in ENCODING_FORMATS:
        raise RequestError(400, "encoding_format", f"{encoding!r} is not one of "
                           f"{', '.join(ENCODING_FORMATS)}")
    mode = payload.get("mode", "disc")
    if mode not in MODES:
        raise RequestError(400, "mode", f"{mode!r} is not one of {', '.join(MODES)}")
    samples = _samples(payload.get("samples"), mode, limits)
    reasoning = payload.get("return_reasoning", False)
    if not isinstance(reasoning, bool):
        raise RequestError(400, "return_reasoning", f"expected true or false, got "
                           f"{_kind(reasoning)}")
    inputs = _inputs(payload.get("input"), limits)
    return EmbeddingRequest(inputs, mode, samples, reasoning, encoding)


def _check_model(model: Any, served: str) -> None:
    if model is None:
        return
    if not isinstance(model, str):
        raise RequestError(400, "model", f"expected a string, got {_kind(model)}")
    if model != served:
        raise RequestError(404, "model", f"model {model!r} is not served here (serving "
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
    return tuple(_item(v, f"input[{i}]", limits) for i, v in enumerate(value))


def _item(value: Any, where: str, limits: Limits) -> InputItem:
    if isinstance(value, str):
        value = {"text": value}
    if not isinstance(value, dict):
        raise RequestError(400, where, f"expected a string or an object, got {_kind(value)}")
    unknown = sorted(set(value) - {"text", "image", "video"})
    if unknown:
        raise RequestError(400, f"{where}.{unknown[0]}", "unknown field (an input has text, "
                           "image and/or video)")
    text = value.get("text", "")
    if not isinstance(text, str):
        raise RequestError(400, f"{where}.text", f"expected a string, got {_kind(text)}")
    if len(text) > limits.max_text_chars:
        raise RequestError(413, f"{where}.text", f"{len(text)} characters, over the limit of "
                           f"{limits.max_text_chars}")
    problem = control_token_problem(text)
    if problem:
        raise RequestError(400, f"{where}.text", problem)
    image = value.get("image")
    image_bytes = None if image is None else decode_image(image, f"{where}.image", limits)
    video = _video(value.get("video"), f"{where}.video", limits)
    if not text.strip() and image_bytes is None and not video:
        raise RequestError(400, where, "empty input: no text, image or video")
    return InputItem(text, image_bytes, video)


def _video(value: Any, where: str, limits: Limits) -> tuple[tuple[bytes, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        raise RequestError(400, where, "expected a non-empty list of frame data URLs")
    if len(value) > limits.max_video_frames:
        raise RequestError(413, where, f"{len(value)} frames, over the limit of "
                           f"{limits.max_video_frames}")
    frames, first_size = [], None
    for i, url in enumerate(value):
        data, ext = decode_image(url, f"{where}[{i}]", limits)
        with Image.open(io.BytesIO(data)) as frame:
            size = frame.size
        if first_size is not None and size != first_size:
            raise RequestError(400, f"{where}[{i}]", f"frame is {size[0]}x{size[1]} but frame 0 "
                               f"is {first_size[0]}x{first_size[1]} (a video's frames share "
                               "one size)")
        first_size = size
        frames.append((data, ext))
    return tuple(frames)


def decode_image(url: Any, where: str, limits: Limits) -> tuple[bytes, str]:
    """A ``data:image/...;base64,`` URL -> (its bytes, a file extension), fully decoded once
    here so that a bad image is this request's 400, not a failed batch."""
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
    return data, _checked_format(data, where, limits)


def _checked_format(data: bytes, where: str, limits: Limits) -> str:
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > limits.max_image_pixels:
                raise RequestError(413, where, f"image is {width}x{height} pixels, over the limit "
                                   f"of {limits.max_image_pixels} pixels")
            image_format = image.format
            image.load()  # a truncated file fails here, not in a batch
    except RequestError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise RequestError(400, where, f"not a decodable image ({err})") from None
    if image_format not in IMAGE_FORMATS:
        raise RequestError(415, where, f"image format {image_format} is not one of "
                           f"{', '.join(IMAGE_FORMATS)}")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise RequestError(400, where, f"aspect ratio of {width}x{height} is over "
                           f"{MAX_ASPECT_RATIO}")
    return IMAGE_FORMATS[image_format]


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
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 50
    dtype: str = "float32"
    limits: Limits = field(default_factory=Limits)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> ServeOptions:
        s = cfg.serve
        limits = Limits(**{k: int(s[k]) for k in Limits.__dataclass_fields__})
        plain = {k: s[k] for k in cls.__dataclass_fields__ if k not in ("limits", "dtype")}
        return cls(**plain, dtype=str(cfg.model.dtype), limits=limits)

    @property
    def resolved_engine(self) -> str:
        return engine_for(self.engine, self.gpus_per_replica)


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

    def gen(self, sides: Sequence[Side], samples: int | None) -> list[GenResult]:
        """Greedy (``samples`` None, as ``umerl eval``) or ``samples`` sampled embeddings."""
        from umerl.model.embed import gen_embeddings
        from umerl.model.sampling import SamplingParams

        o = self.options
        if samples is None:
            sampling = SamplingParams(max_new_tokens=o.max_new_tokens, do_sample=False)
        else:
            sampling = SamplingParams(max_new_tokens=o.max_new_tokens,
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
        try:
            results = await self.run([item for item, _ in batch])
        except Exception as err:  # the batch's callers fail; the batcher keeps serving
            results = [err] * len(batch)
        for (_, future), result in zip(batch, results):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)


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


@dataclass(frozen=True)
class ItemAnswer:
    """One input's response item and what it cost."""

    body: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int


class EmbeddingService:
    """One replica: a model, a disc batcher, a gen batcher and the HTTP routes."""

    def __init__(self, checkpoint: str, options: ServeOptions, router: Router | None):
        use_reserved_cpus(options.cpus_per_replica)
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

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        try:
            return JSONResponse(await self._route(request))
        except RequestError as err:
            return JSONResponse(err.payload(), status_code=err.status)
        except Exception as err:  # a bug or a failed batch: this request fails, not the replica
            logger.exception("request failed")
            failure = RequestError(500, "server", f"{type(err).__name__}: {err}")
            return JSONResponse(failure.payload(), status_code=500)

    async def _route(self, request: Any) -> dict[str, Any]:
        path, method = request.scope["path"].rstrip("/") or "/", request.method
        routes = {"/health": "GET", "/v1/models": "GET", "/v1/embeddings": "POST"}
        if path not in routes:
            raise RequestError(404, "path", f"no route {path}; routes: {', '.join(routes)}")
        if method != routes[path]:
            raise RequestError(405, "method", f"{path} takes {routes[path]}, not {method}")
        if path == "/health":
            return {"status": "ok", "model": self.model_name, "router": self.router is not None,
                    "stats": dict(self.stats)}
        if path == "/v1/models":
            return self._models()
        declared = int(request.headers.get("content-length") or 0)
        if declared > self.options.limits.max_request_bytes:
            raise RequestError(413, "body", f"{declared} bytes, over the limit of "
                               f"{self.options.limits.max_request_bytes}")
        body = await request.body()
        if len(body) <= INLINE_PARSE_BYTES:
            parsed = parse_request(body, self.options.limits, self.model_name)
        else:  # decoding a large body's images would hold up every other request
            parsed = await asyncio.to_thread(parse_request, body, self.options.limits,
                                             self.model_name)
        return await self.embed(parsed)

    def _models(self) -> dict[str, Any]:
        modes = ["disc", "gen"] + (["auto"] if self.router is not None else [])
        return {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "owned_by": "umerl", "modes": modes,
            "dimensions": self.embedder.bundle.hidden_size,
            "max_new_tokens": self.options.max_new_tokens,
        }]}

    async def embed(self, request: EmbeddingRequest) -> dict[str, Any]:
        """The response body for a checked request (OpenAI's embeddings shape plus modes)."""
        if request.mode == "auto" and self.router is None:
            raise RequestError(400, "mode", "'auto' needs a router: start the service with "
                               "`umerl serve CHECKPOINT --router ROUTER`")
        with tempfile.TemporaryDirectory(dir=self.media_root) as tmp:
            sides = [materialise(item, Path(tmp), i) for i, item in enumerate(request.inputs)]
            # Mode gen checks prompt lengths before generating; disc and auto read them off the
            # encoding of their disc batch, before its forward pass (one tokenisation, not two).
            lengths = [self._checked_length(self.embedder.prompt_tokens(side), i)
                       if request.mode == "gen" else 0 for i, side in enumerate(sides)]
            # Every item finishes before the folder goes: a batch still reading one of its
            # files must not fail for the other requests it holds.
            done = await asyncio.gather(
                *(self._embed_one(side, i, lengths[i], request) for i, side in enumerate(sides)),
                return_exceptions=True)
        failed = [d for d in done if isinstance(d, BaseException)]
        if failed:
            raise failed[0]
        prompt_tokens = sum(answer.prompt_tokens for answer in done)
        completion_tokens = sum(answer.completion_tokens for answer in done)
        data = [{"object": "embedding", "index": i, **answer.body} for i, answer in enumerate(done)]
        return {
            "object": "list", "model": self.model_name, "data": data,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }

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
        return await asyncio.to_thread(self.embedder.disc, sides)

    async def _gen_batch(self, jobs: list[GenJob]) -> list[GenResult]:
        """One generate call per distinct ``samples`` value in the batch (usually one)."""
        self._count("gen", len(jobs))
        results: dict[int, GenResult] = {}
        for samples in dict.fromkeys(job.samples for job in jobs):
            chosen = [i for i, job in enumerate(jobs) if job.samples == samples]
            out = await asyncio.to_thread(self.embedder.gen, [jobs[i].side for i in chosen],
                                          samples)
            results.update(zip(chosen, out))
        return [results[i] for i in range(len(jobs))]


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


def build_app(checkpoint: str, options: ServeOptions, router: Router | None) -> Any:
    """The Serve application: ``num_replicas`` replicas of ``EmbeddingService``."""
    replica_env, _ = serve_env(options)
    deployment = serve.deployment(EmbeddingService, name="EmbeddingService").options(
        num_replicas=options.num_replicas, max_ongoing_requests=options.max_ongoing_requests,
        ray_actor_options={"num_cpus": options.cpus_per_replica,
                           "num_gpus": options.gpus_per_replica,
                           "runtime_env": {"env_vars": replica_env}},
    )
    return deployment.bind(str(checkpoint), options, router)


def start_service(checkpoint: str, options: ServeOptions, router: Router | None) -> ServiceUrls:
    """Start Serve's HTTP proxy on ``host:port``, deploy the application and wait for the
    replicas' own servers (with ``direct_port``). Ray must already be initialised
    (``umerl.runtime.ray_start.init_ray``)."""
    _, controller_env = serve_env(options)
    serve.start(http_options={"host": options.host, "port": options.port},
                controller_options={"runtime_env": {"env_vars": controller_env}})
    # No access log: a line per request through Ray's log pipeline costs the replica CPU.
    serve.run(build_app(checkpoint, options, router), name=APP_NAME, route_prefix="/",
              logging_config={"enable_access_log": False})
    proxy = f"http://{options.host}:{options.port}"
    if options.direct_port is None:
        return ServiceUrls(proxy)
    return ServiceUrls(proxy, _direct_urls(options))


def _direct_urls(options: ServeOptions, timeout_s: float = 30.0) -> tuple[str, ...]:
    """The replicas' own servers, from the controller's target groups (what Serve's status and
    dashboard report; the controller records a replica's port on its next reconcile)."""
    from ray.serve.context import _get_global_client

    first, last = options.direct_port, options.direct_port + DIRECT_PORT_SPAN - 1
    deadline = time.monotonic() + timeout_s
    while True:
        targets = sorted(
            (target["port"], target["ip"])
            for group in _get_global_client().get_serve_details().get("target_groups", [])
            if group.get("app_name") == APP_NAME and group.get("protocol") == "HTTP"
            for target in group["targets"] if first <= target["port"] <= last)
        if len(targets) >= options.num_replicas or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if len(targets) < options.num_replicas:
        raise RuntimeError(f"{len(targets)} of {options.num_replicas} replicas report a direct "
                           f"port in {first}..{last} after {timeout_s:.0f} s (serve.direct_port)")
    # A replica listens on serve.host of its own node: name that node when host is a wildcard.
    wildcard = options.host in ("0.0.0.0", "::")
    return tuple(f"http://{ip if wildcard else options.host}:{port}" for port, ip in targets)


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
    for i, url in enumerate(urls.direct):
        print(f"[serve] replica {i} directly (no proxy hop): {url}/v1/embeddings", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("[serve] shutting down", flush=True)
    finally:
        serve.shutdown()

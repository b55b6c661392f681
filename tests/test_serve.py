"""The embedding service: a real Ray Serve application on 127.0.0.1 with the tiny model.

One application for the whole module (each Serve start costs seconds here). Expected
embeddings come from ``umerl.model.embed`` in this process, on the same inputs read from files.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rollout.transformers_engine import TransformersEngine
from umerl.config.recipe import ConfigError, load_recipe
from umerl.config.schema import DIRECT_PORT_SPAN
from umerl.data.formats import Side
from umerl.eval.router import CHEAP_FEATURES, Router
from umerl.model.embed import disc_embeddings, gen_embeddings
from umerl.model.loading import context_length
from umerl.model.sampling import SamplingParams
from umerl.serve.client import (
    EmbeddingClient,
    ServiceError,
    data_url,
    decode_embedding,
    image_input,
    video_input,
)
from umerl.serve.service import (
    APP_NAME,
    Batcher,
    Embedder,
    Limits,
    RequestError,
    ServeOptions,
    direct_urls_from,
    parse_request,
)

MAX_NEW_TOKENS = 8
# The HTTP tests' service: past QUEUE_LIMIT requests held by its replica a 503, past
# REQUEST_TIMEOUT_S a 504 (both reachable within seconds, above what the other tests need).
QUEUE_LIMIT = 10
REQUEST_TIMEOUT_S = 5
FAULTS = Path(__file__).parent / "serve_faults"  # its sitecustomize: slow gen batches on demand
LIMITS = Limits(max_inputs=4, max_samples=2, max_request_bytes=1 << 20,
                max_image_bytes=40_000, max_image_pixels=160 * 160, max_video_frames=4,
                max_text_chars=500, max_request_pixels=8 * 160 * 160)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve-media")
    paths = {}
    for name, size, colour in [("red", (64, 48), (220, 20, 20)), ("blue", (40, 40), (0, 0, 200))]:
        Image.new("RGB", size, colour).save(root / f"{name}.png")
        paths[name] = root / f"{name}.png"
    for i in range(2):
        Image.new("RGB", (56, 56), (i * 90, 0, 200)).save(root / f"frame{i}.png")
        paths[f"frame{i}"] = root / f"frame{i}.png"
    Image.new("RGB", (32, 32)).save(root / "small.png")
    paths["small"] = root / "small.png"
    # Random pixels do not compress: a PNG over the byte limit that is under the pixel limit.
    noise = np.random.default_rng(0).integers(0, 255, (150, 150, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "heavy.png")
    paths["heavy"] = root / "heavy.png"
    Image.new("RGB", (300, 300)).save(root / "wide.png")  # over the pixel limit
    paths["wide"] = root / "wide.png"
    return paths


@pytest.fixture(scope="module")
def router_file(tmp_path_factory, tiny_bundle) -> Path:
    """A hand-set router: text-only inputs go to gen, inputs with media stay on disc."""
    width = tiny_bundle.hidden_size + len(CHEAP_FEATURES)
    weights = [0.0] * width
    weights[tiny_bundle.hidden_size + CHEAP_FEATURES.index("text_only")] = 10.0
    router = Router(hidden_size=tiny_bundle.hidden_size, mean=[0.0] * width,
                    scale=[1.0] * width, weights=weights, bias=-5.0, threshold=0.5)
    return router.save(tmp_path_factory.mktemp("router") / "router.json")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


API_KEY = "test-key-0123456789"


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (and its key), made here with ``cryptography``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="module")
def service_urls(tiny_model_dir, router_file, tmp_path_factory):
    """The real command, `umerl serve`, in its own process; Ctrl-C (SIGINT) stops it. Its two
    ways in: Serve's proxy, and the one replica's own server (direct ingress); both over TLS
    and with an API key (the clients here take both from the environment)."""
    import os

    port, direct_port = _free_port(), _free_port()
    while direct_port <= port < direct_port + DIRECT_PORT_SPAN:  # the recipe refuses overlap
        port = _free_port()
    cert, key = _self_signed(tmp_path_factory.mktemp("tls"))
    limits = [f"serve.{k}={getattr(LIMITS, k)}" for k in Limits.__dataclass_fields__]
    command = [sys.executable, "-m", "umerl.cli", "serve", str(tiny_model_dir), "--router",
               str(router_file), f"serve.port={port}", f"serve.direct_port={direct_port}",
               "serve.model_name=tiny",
               "serve.disc_batch_size=8", "serve.disc_batch_wait_s=0.2",
               "serve.gen_batch_size=8", "serve.gen_batch_wait_s=0.2",
               f"serve.max_new_tokens={MAX_NEW_TOKENS}", "ray.object_store_memory=268435456",
               "serve.body_timeout_s=2", f"serve.ssl_certfile={cert}",
               f"serve.ssl_keyfile={key}", f"serve.max_queued_requests={QUEUE_LIMIT}",
               f"serve.request_timeout_s={REQUEST_TIMEOUT_S}", *limits]
    log = tmp_path_factory.mktemp("serve-log") / "serve.log"
    faults = tmp_path_factory.mktemp("serve-faults")
    saved = {k: os.environ.get(k) for k in ("UMERL_API_KEY", "SSL_CERT_FILE")}
    os.environ.update(UMERL_API_KEY=API_KEY, SSL_CERT_FILE=str(cert))
    # The service's processes (its Ray workers inherit this environment) load serve_faults.
    path = os.pathsep.join(p for p in (str(FAULTS), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "UMERL_TEST_SERVE_FAULTS": str(faults)}
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    urls = {"proxy": f"https://127.0.0.1:{port}", "direct": f"https://127.0.0.1:{direct_port}"}
    try:
        _wait_until_healthy(urls["proxy"], process, log)
        _wait_until_healthy(urls["direct"], process, log)
        yield urls | {"log": log, "cert": cert, "faults": faults, "process": process}
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(params=["direct", "proxy"])
def service(request, service_urls) -> str:
    """Each test over HTTP runs once per way in."""
    return service_urls[request.param]


def test_direct_ports_overlapping_the_proxy_port_is_a_recipe_error() -> None:
    with pytest.raises(ConfigError, match=r"serve\.port.*serve\.direct_port"):
        load_recipe(None, ["serve.port=8150", "serve.direct_port=8100"])
    with pytest.raises(ConfigError, match=r"serve\.direct_port"):
        load_recipe(None, ["serve.direct_port=65500"])  # its 100 ports run past 65535
    load_recipe(None, ["serve.port=8200", "serve.direct_port=8100"])
    load_recipe(None, ["serve.port=8150", "serve.direct_port=null"])


def test_serve_prints_the_replicas_own_url(service_urls) -> None:
    # The replica answers as soon as its server is up; the line follows once the controller
    # has recorded the port, so give it time.
    line = f"replica 0 directly (no proxy hop): {service_urls['direct']}/v1/embeddings"
    deadline = time.monotonic() + 60
    while line not in service_urls["log"].read_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert line in service_urls["log"].read_text()


def _wait_until_healthy(url: str, process: subprocess.Popen, log: Path,
                        timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"umerl serve exited with {process.returncode}:\n{log.read_text()}")
        try:
            if EmbeddingClient(url, timeout_s=5).health()["status"] == "ok":
                return
        except (OSError, ServiceError):
            time.sleep(1.0)
    pytest.fail(f"umerl serve not healthy after {timeout_s} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def inputs(media) -> list[tuple[dict | str, Side]]:
    """(what the client sends, the same input as a Side over the files)."""
    frames = [media["frame0"], media["frame1"]]
    return [
        ("a blue square", Side(text="a blue square")),
        (image_input(media["red"], "Find the red one."),
         Side(text="Find the red one.", images=(str(media["red"]),))),
        (video_input(frames, "What happens?"),
         Side(text="What happens?", video=tuple(str(f) for f in frames))),
    ]


def _unit(vectors: np.ndarray) -> None:
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=-1), 1.0, atol=1e-5)


def test_health_and_models(service, service_urls) -> None:
    client = EmbeddingClient(service)
    health = client.health()
    assert health["status"] == "ok" and health["model"] == "tiny" and health["router"] is True
    models = client.models()
    model = models["data"][0]
    assert model["id"] == "tiny" and model["modes"] == ["disc", "gen", "auto"]
    assert models["direct_urls"] == [service_urls["direct"]]  # the one live replica


def test_disc_over_http_equals_in_process(service, inputs, tiny_bundle) -> None:
    response = EmbeddingClient(service, model="tiny").embed([x for x, _ in inputs], mode="disc")
    expected = disc_embeddings(tiny_bundle, [s for _, s in inputs]).numpy()
    np.testing.assert_allclose(response.vectors, expected, atol=1e-5)
    _unit(response.vectors)
    assert response.modes == ["disc"] * 3
    assert [d["index"] for d in response.raw["data"]] == [0, 1, 2]
    assert response.raw["object"] == "list" and response.raw["usage"]["prompt_tokens"] > 0


def test_gen_over_http_equals_in_process(service, inputs, tiny_bundle) -> None:
    response = EmbeddingClient(service).embed([x for x, _ in inputs], mode="gen",
                                              return_reasoning=True)
    greedy = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    expected = gen_embeddings(tiny_bundle, TransformersEngine(tiny_bundle),
                              [s for _, s in inputs], 1, greedy)
    np.testing.assert_allclose(response.vectors, expected.embeddings[:, 0].numpy(), atol=1e-5)
    _unit(response.vectors)
    assert response.reasoning == [c[0] for c in expected.completions]
    assert response.modes == ["gen"] * 3
    assert response.raw["usage"]["completion_tokens"] > 0


def test_dynamic_batching_matches_single_requests(service, media, tiny_bundle) -> None:
    texts = [f"item number {i}" for i in range(6)] + [image_input(media["blue"], "blue")]
    before = EmbeddingClient(service).health()["stats"]

    def one(item):  # one client (one connection) per request, all at once
        return EmbeddingClient(service).embed([item]).vectors[0]

    with ThreadPoolExecutor(len(texts)) as pool:
        together = np.stack(list(pool.map(one, texts)))
    stats = EmbeddingClient(service).health()["stats"]
    batches = stats["disc_batches"] - before["disc_batches"]
    assert batches < len(texts) and stats["disc_largest_batch"] > 1  # requests were batched
    alone = np.stack([EmbeddingClient(service).embed([t]).vectors[0] for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    sides = [Side(text=t) for t in texts[:-1]] + [Side(text="blue",
                                                       images=(str(media["blue"]),))]
    np.testing.assert_allclose(together, disc_embeddings(tiny_bundle, sides).numpy(), atol=1e-5)


def test_samples_returns_k_unit_embeddings(service) -> None:
    response = EmbeddingClient(service).embed(["a red square", "a cat"], mode="gen", samples=2,
                                              return_reasoning=True)
    for item, samples, reasoning in zip(response.raw["data"], response.samples,
                                        response.reasoning):
        assert samples.shape == (2, response.vectors.shape[1])
        _unit(samples)
        np.testing.assert_array_equal(decode_embedding(item["embedding"]), samples[0])
        assert isinstance(reasoning, list) and len(reasoning) == 2


def test_auto_routes_by_router_file(service, inputs, tiny_bundle) -> None:
    response = EmbeddingClient(service).embed([x for x, _ in inputs], mode="auto")
    assert response.modes == ["gen", "disc", "disc"]  # the router sends text-only to gen
    sides = [s for _, s in inputs]
    greedy = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    gen = gen_embeddings(tiny_bundle, TransformersEngine(tiny_bundle), sides[:1], 1, greedy)
    np.testing.assert_allclose(response.vectors[0], gen.embeddings[0, 0].numpy(), atol=1e-5)
    disc = disc_embeddings(tiny_bundle, sides[1:]).numpy()
    np.testing.assert_allclose(response.vectors[1:], disc, atol=1e-5)


def _float32_from_base64(text: str) -> np.ndarray:
    """OpenAI's base64 embedding, decoded here without the client: float32 little-endian."""
    raw = base64.b64decode(text)
    return np.array(struct.unpack(f"<{len(raw) // 4}f", raw), dtype=np.float32)


def test_base64_embeddings_equal_float_ones_exactly(service, inputs) -> None:
    def raw(encoding: str, **fields) -> dict:
        body = {"input": [x for x, _ in inputs], "encoding_format": encoding, **fields}
        return EmbeddingClient(service).request("POST", "/v1/embeddings",
                                                json.dumps(body).encode())

    from umerl.serve.service import encode_embedding

    # The encodings of one vector: base64 holds the float32 bytes the float list rounds to.
    vector = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    np.testing.assert_array_equal(_float32_from_base64(encode_embedding(vector, "base64")),
                                  np.asarray(encode_embedding(vector, "float"), np.float32))
    as_float, as_base64 = raw("float"), raw("base64")
    assert all(isinstance(d["embedding"], str) for d in as_base64["data"])
    # Two requests are two model calls: when another caller's input shares a batch, the batch's
    # shape changes the float32 sums (about 1e-7, seen once through the proxy). The encodings
    # themselves are compared exactly above and within one response (the sampled path).
    for f, b in zip(as_float["data"], as_base64["data"]):
        np.testing.assert_allclose(_float32_from_base64(b["embedding"]),
                                   np.asarray(f["embedding"], dtype=np.float32), rtol=0,
                                   atol=1e-6)
    # The sampled path encodes every sample: k base64 strings, each a unit vector.
    sampled = raw("base64", mode="gen", samples=2)["data"][0]
    vectors = np.stack([_float32_from_base64(t) for t in sampled["samples"]])
    assert vectors.shape == (2, len(as_float["data"][0]["embedding"]))
    _unit(vectors)
    np.testing.assert_array_equal(_float32_from_base64(sampled["embedding"]), vectors[0])
    # The client's default (base64) gives the float path's vectors.
    np.testing.assert_allclose(
        EmbeddingClient(service).embed([x for x, _ in inputs]).vectors,
        np.asarray([d["embedding"] for d in as_float["data"]], dtype=np.float32), rtol=0,
        atol=1e-6)


def _post(url: str, body: bytes, method: str = "POST", path: str = "/v1/embeddings"):
    client = EmbeddingClient(url)
    try:
        return 200, client.request(method, path, body)
    except ServiceError as err:
        return err.status, err.field


def _bad_cases(media: dict[str, Path]) -> list[tuple[str, bytes, int, str]]:
    def body(**fields) -> bytes:
        return json.dumps({"input": ["x"], **fields}).encode()

    frames = [data_url(media["frame0"]), data_url(media["small"])]
    garbage = "data:image/png;base64," + base64.b64encode(b"not an image").decode()
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, format="EPS")
    eps = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return [
        ("malformed JSON", b'{"input": [', 400, "body"),
        ("not an object", b'["x"]', 400, "body"),
        ("unknown mode", body(mode="fast"), 400, "mode"),
        ("unknown field", body(temperature=2), 400, "temperature"),
        ("other model", body(model="gpt"), 404, "model"),
        ("empty input", body(input=[]), 400, "input"),
        ("missing input", b"{}", 400, "input"),
        ("empty item", body(input=[{"text": " "}]), 400, "input[0]"),
        ("too many items", body(input=["a"] * 5), 413, "input"),
        ("too many samples", body(mode="gen", samples=3), 400, "samples"),
        ("samples without gen", body(samples=1), 400, "samples"),
        ("a server path", body(input=[{"image": "/etc/passwd"}]), 400, "input[0].image"),
        ("a file URL", body(input=[{"image": "file:///etc/passwd"}]), 400, "input[0].image"),
        ("bad base64", body(input=[{"image": "data:image/png;base64,@@@"}]), 400,
         "input[0].image"),
        ("not an image", body(input=[{"image": garbage}]), 400, "input[0].image"),
        ("image over the byte limit", body(input=[image_input(media["heavy"])]), 413,
         "input[0].image"),
        ("image over the pixel limit", body(input=[image_input(media["wide"])]), 413,
         "input[0].image"),
        ("frames of two sizes", body(input=[{"video": frames}]), 400, "input[0].video[1]"),
        ("text too long", body(input=["y" * 501]), 413, "input[0].text"),
        ("reasoning not a bool", body(return_reasoning="yes"), 400, "return_reasoning"),
        ("unknown encoding", body(encoding_format="binary"), 400, "encoding_format"),
        ("encoding not a string", body(encoding_format=["base64"]), 400, "encoding_format"),
        ("a lone surrogate", body(input=["a \ud800 b"]), 400, "input[0].text"),
        ("an image placeholder", body(input=["a <|image_pad|>"]), 400, "input[0].text"),
        ("a video placeholder", body(input=["a <|video_pad|>"]), 400, "input[0].text"),
        ("deep JSON", b"[" * 200_000 + b"]" * 200_000, 400, "body"),
        ("EPS sent as PNG", body(input=[{"image": eps}]), 415, "input[0].image"),
        ("invalid UTF-8", b'{"input": ["\xff\xfe"]}', 400, "body"),
    ]


def test_bad_requests_get_4xx_naming_the_field(service, media) -> None:
    for name, payload, status, field in _bad_cases(media):
        assert _post(service, payload) == (status, field), name
        # The service keeps serving: the next good request succeeds.
        assert EmbeddingClient(service).embed(["still here"]).vectors.shape[0] == 1, name
    assert _post(service, b"", "GET") == (405, "method")
    assert _post(service, b"", "GET", "/v1/nothing") == (404, "path")


def test_parse_request_reads_items() -> None:
    small = io.BytesIO()
    Image.new("RGB", (20, 10)).save(small, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(small.getvalue()).decode()
    body = json.dumps({"input": ["a", {"text": "b", "image": url}], "mode": "gen",
                       "samples": 2}).encode()
    request = parse_request(body, LIMITS, "tiny")
    assert [i.text for i in request.inputs] == ["a", "b"]
    assert request.inputs[1].image == (small.getvalue(), "png")
    assert request.samples == 2 and request.mode == "gen"
    with pytest.raises(RequestError, match="body"):
        parse_request(b"x" * (LIMITS.max_request_bytes + 1), LIMITS, "tiny")


@pytest.mark.parametrize("token", ["<|image_pad|>", "<|im_end|>", "<gen_emb>"])
def test_control_tokens_in_a_text_are_a_400_naming_field_and_token(token: str) -> None:
    """One such text would otherwise fail the whole batch it is served in."""
    body = json.dumps({"input": ["fine", {"text": f"a {token} b"}]}).encode()
    with pytest.raises(RequestError) as err:
        parse_request(body, LIMITS, "tiny")
    assert (err.value.status, err.value.field) == (400, "input[1].text")
    assert token in err.value.message


def test_parse_request_reads_encoding_format() -> None:
    body = json.dumps({"input": "a", "encoding_format": "base64"}).encode()
    assert parse_request(body, LIMITS, "tiny").encoding_format == "base64"
    assert parse_request(b'{"input": "a"}', LIMITS, "tiny").encoding_format == "float"


def test_disc_batch_reads_prompt_lengths_off_its_encoding(tiny_model_dir, tiny_bundle) -> None:
    """Disc and auto check prompt lengths on the batch's own encoding: a prompt over the room
    gets no embedding (and no forward pass); the others equal ``disc_embeddings``."""
    sides = [Side(text="a red square"), Side(text="word " * 40)]
    lengths = [tiny_bundle.encoder.prompt_length(s) for s in sides]
    context = context_length(tiny_model_dir)
    room = (lengths[0] + lengths[1]) // 2  # the first fits, the second does not
    embedder = Embedder(str(tiny_model_dir), ServeOptions(max_new_tokens=context - room))
    assert embedder.prompt_room == room
    short, long = embedder.disc(sides)
    assert (short.prompt_tokens, long.prompt_tokens) == tuple(lengths)
    assert long.embedding is None
    np.testing.assert_allclose(short.embedding, disc_embeddings(tiny_bundle, sides[:1])[0],
                               atol=1e-5)


def test_batcher_runs_what_arrived_during_a_batch_together() -> None:
    batches: list[list[int]] = []

    async def run(items: list[int]) -> list[int]:
        batches.append(items)
        await asyncio.sleep(0.05)  # a batch takes a while: the next calls arrive meanwhile
        if -1 in items:
            raise RuntimeError("bad batch")
        return [2 * i for i in items]

    async def scenario() -> tuple[list, list]:
        batcher = Batcher(run, max_size=4, wait_s=0.0)
        first = asyncio.ensure_future(batcher(0))
        await asyncio.sleep(0.01)  # batch [0] is running
        rest = [asyncio.ensure_future(batcher(i)) for i in range(1, 7)]
        results = await asyncio.gather(first, *rest)
        failed = await asyncio.gather(batcher(-1), return_exceptions=True)
        return results, failed + [await batcher(5)]

    results, (failure, after) = asyncio.run(scenario())
    assert results == [0, 2, 4, 6, 8, 10, 12]
    # Not [1], [2], ... as each arrived: what waited ran as full batches once the model was free.
    assert batches[:3] == [[0], [1, 2, 3, 4], [5, 6]]
    assert isinstance(failure, RuntimeError) and after == 10  # a failed batch fails its callers


# ---------------------------------------------------------------------------------------------
# One replica in this process, called as Ray Serve calls it (a Starlette request), so that
# failures can be injected into its model and the body can arrive as a test wants.

ONE_MIB = 1 << 20


def _scope(method: str, path: str, headers: dict[str, str]) -> dict:
    return {"type": "http", "method": method, "path": path, "root_path": "",
            "query_string": b"", "scheme": "http", "server": ("127.0.0.1", 8000),
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}


def _request(body: bytes | None = None, *, chunks=None, method: str = "POST",
             path: str = "/v1/embeddings", headers: dict[str, str] | None = None):
    """A Starlette request whose body is ``body`` or arrives as the async iterator
    ``chunks`` yields (more_body until it ends)."""
    from starlette.requests import Request

    headers = {"content-type": "application/json", **(headers or {})}
    if body is not None:
        chunks_iter = iter([body])

        async def source():
            for part in chunks_iter:
                yield part
        chunks = source()
    iterator = chunks.__aiter__() if chunks is not None else None

    async def receive() -> dict:
        if iterator is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        try:
            return {"type": "http.request", "body": await anext(iterator), "more_body": True}
        except StopAsyncIteration:
            return {"type": "http.request", "body": b"", "more_body": False}

    return Request(_scope(method, path, headers), receive)


def _answer(response) -> tuple[int, dict]:
    return response.status_code, json.loads(response.body)


@pytest.fixture(scope="module")
def local_service(tiny_model_dir, router_file):
    from umerl.serve.service import EmbeddingService

    options = ServeOptions(model_name="tiny", disc_batch_size=8, disc_batch_wait_s=0.2,
                           gen_batch_size=8, gen_batch_wait_s=0.2,
                           max_new_tokens=MAX_NEW_TOKENS, limits=LIMITS)
    service = EmbeddingService(str(tiny_model_dir), options, Router.load(router_file))
    yield service
    import shutil

    shutil.rmtree(service.media_root, ignore_errors=True)


@pytest.fixture
def replica(local_service, monkeypatch):
    """The in-process replica with its options restorable per test."""
    monkeypatch.setattr(local_service, "options", local_service.options)
    monkeypatch.setattr(local_service.embedder, "disc", local_service.embedder.disc)
    monkeypatch.setattr(local_service.embedder, "gen", local_service.embedder.gen)
    return local_service


def _embed_body(inputs, **fields) -> bytes:
    return json.dumps({"input": inputs, **fields}).encode()


def test_a_failed_batch_is_retried_per_input() -> None:
    """Only the input that fails alone gets an error; the server's fault (every input fails
    alone) still reaches every caller."""
    from umerl.serve.service import InputFailed

    async def run(items: list[int]) -> list[int]:
        if -1 in items or 99 in items and len(items) == 1:
            raise RuntimeError("bad batch")
        return [2 * i for i in items]

    async def scenario(values: list[int]) -> list:
        batcher = Batcher(run, max_size=8, wait_s=0.05)
        return await asyncio.gather(*(batcher(v) for v in values), return_exceptions=True)

    out = asyncio.run(scenario([1, -1, 2, 3]))
    assert out[0] == 2 and out[2:] == [4, 6]
    assert isinstance(out[1], InputFailed)

    async def broken(items: list[int]) -> list[int]:
        raise RuntimeError("engine down")

    async def all_fail() -> list:
        batcher = Batcher(broken, max_size=8, wait_s=0.05)
        return await asyncio.gather(*(batcher(v) for v in (1, 2)), return_exceptions=True)

    assert all(isinstance(e, RuntimeError) and not isinstance(e, InputFailed)
               for e in asyncio.run(all_fail()))


@pytest.mark.parametrize("mode", ["disc", "gen", "auto"])
def test_a_poisoned_input_fails_alone_in_process(replica, mode: str) -> None:
    """Seven clean requests and one poisoned one share a batch: 7 x 200, one 400 naming the
    field. A lone surrogate passed the old checks and failed the tokenizer for all eight."""
    async def scenario():
        clean = [_request(_embed_body([f"clean text {i}"], mode=mode)) for i in range(7)]
        poisoned = _request(_embed_body(["a \ud800 b"], mode=mode))
        return await asyncio.gather(*(replica(r) for r in [*clean, poisoned]))

    answers = [_answer(r) for r in asyncio.run(scenario())]
    assert [s for s, _ in answers[:7]] == [200] * 7
    assert answers[7][0] == 400 and answers[7][1]["error"]["param"] == "input[0].text"


def test_model_failure_on_one_input_is_a_422_for_it_alone(replica, monkeypatch) -> None:
    real = replica.embedder.disc

    def disc(sides):
        if any("poison" in s.text for s in sides):
            raise RuntimeError("a model failure this input alone causes")
        return real(sides)

    monkeypatch.setattr(replica.embedder, "disc", disc)

    async def scenario():
        requests = [_request(_embed_body([f"clean {i}"])) for i in range(3)]
        requests.append(_request(_embed_body(["fine", "poison"])))
        return await asyncio.gather(*(replica(r) for r in requests))

    answers = [_answer(r) for r in asyncio.run(scenario())]
    assert [s for s, _ in answers[:3]] == [200] * 3
    assert answers[3][0] == 422 and answers[3][1]["error"]["param"] == "input[1]"


def test_a_5xx_body_names_a_request_id_not_server_details(replica, monkeypatch) -> None:
    def disc(sides):
        raise RuntimeError("cannot read /tmp/umerl-serve-secret/0-image.png")

    monkeypatch.setattr(replica.embedder, "disc", disc)
    status, body = _answer(asyncio.run(replica(_request(_embed_body(["x"])))))
    assert status == 500
    assert "/tmp" not in json.dumps(body) and "RuntimeError" not in json.dumps(body)
    assert body["error"]["request_id"] in body["error"]["message"]


def test_a_disconnected_caller_leaves_its_gen_batch_intact(replica, media, tiny_bundle,
                                                           monkeypatch) -> None:
    """One caller of a shared gen batch goes away 1 s in, while the batch (slowed down here)
    still has to read its images: the others get the in-process embeddings, and its media
    folder goes once the batch ends."""
    real = replica.embedder.gen

    def slow_gen(sides, samples, max_new_tokens=None):
        time.sleep(1.5)  # the batch is running when the caller leaves
        return real(sides, samples, max_new_tokens)

    monkeypatch.setattr(replica.embedder, "gen", slow_gen)
    names = ["red", "blue", "small"]

    async def scenario():
        tasks = [asyncio.ensure_future(replica(_request(_embed_body(
            [image_input(media[n], f"what is {n}?")], mode="gen")))) for n in names]
        await asyncio.sleep(1.0)
        tasks[1].cancel()  # what Serve does when the client disconnects
        done = await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0.1)  # the delayed removal of the folder
        return done

    done = asyncio.run(scenario())
    assert isinstance(done[1], asyncio.CancelledError)
    kept = [0, 2]
    vectors = []
    for i in kept:
        status, body = _answer(done[i])
        assert status == 200, body
        vectors.append(decode_embedding(body["data"][0]["embedding"]))
    greedy = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    sides = [Side(text=f"what is {names[i]}?", images=(str(media[names[i]]),)) for i in kept]
    expected = gen_embeddings(tiny_bundle, TransformersEngine(tiny_bundle), sides, 1, greedy)
    np.testing.assert_allclose(np.stack(vectors), expected.embeddings[:, 0].numpy(), atol=1e-5)
    assert list(replica.media_root.iterdir()) == []


def test_a_caller_that_leaves_as_its_body_arrives_is_not_embedded(replica, monkeypatch) -> None:
    """A client that sends its body and leaves at once: Ray's direct ingress reads the body
    and then the disconnect, and cancels the request in the same loop turn as the body
    arrives. The cancel must stop the request before its input joins a batch. It did not:
    ``asyncio.wait_for`` (Python < 3.12) drops a cancel that lands when its awaitable is
    already done, so every such request was embedded for nobody (20 of 20 on the direct port,
    0 through the proxy)."""
    embedded: list[int] = []
    real = replica.embedder.disc

    def counted(sides):
        embedded.append(len(sides))
        return real(sides)

    monkeypatch.setattr(replica.embedder, "disc", counted)

    async def scenario() -> BaseException | None:
        arrived = asyncio.Event()

        async def body():
            await arrived.wait()
            yield _embed_body(["a caller who leaves"])

        task = asyncio.ensure_future(replica(_request(chunks=body())))
        await asyncio.sleep(0.05)  # the request waits for its body
        arrived.set()
        task.cancel()  # Serve's answer to the disconnect right behind the body
        result = (await asyncio.gather(task, return_exceptions=True))[0]
        await asyncio.sleep(2 * replica.options.disc_batch_wait_s)  # a batch would have run
        return result

    assert isinstance(asyncio.run(scenario()), asyncio.CancelledError)
    assert embedded == []
    assert replica.in_flight == 0


def test_a_caller_gone_before_its_body_is_a_499_not_a_logged_500(replica, caplog) -> None:
    """A client that sends and leaves at once (the server sees the disconnect before the
    body): no server error and nothing logged, so a client doing it in a loop cannot flood
    the log with tracebacks."""
    from starlette.requests import Request

    async def gone() -> dict:
        return {"type": "http.disconnect"}

    request = Request(_scope("POST", "/v1/embeddings", {"content-type": "application/json"}),
                      gone)
    with caplog.at_level("INFO", logger="umerl.serve.service"):
        response = asyncio.run(replica(request))
    assert response.status_code == 499
    assert caplog.records == []
    assert replica.in_flight == 0


def test_a_chunked_body_stops_at_the_byte_limit(replica, monkeypatch) -> None:
    """200 MiB sent chunked (no Content-Length): a 413 after reading at most the limit and
    one chunk, with memory growth well under the body's size."""
    import dataclasses
    import tracemalloc

    limit = 8 * ONE_MIB
    replica.options = dataclasses.replace(
        replica.options, limits=dataclasses.replace(LIMITS, max_request_bytes=limit))
    chunk = b" " * ONE_MIB
    sent = 0

    async def chunks():
        nonlocal sent
        for _ in range(200):
            sent += len(chunk)
            yield chunk

    tracemalloc.start()
    try:
        status, body = _answer(asyncio.run(replica(_request(chunks=chunks()))))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (status, body["error"]["param"]) == (413, "body")
    assert sent <= limit + ONE_MIB
    assert peak < 100 * ONE_MIB


def _many_frames_body(frames_per_input: int = 16, inputs: int = 32) -> bytes:
    buffer = io.BytesIO()
    pixels = np.zeros((2048, 2048, 3), dtype=np.uint8)  # mostly flat: a small PNG
    pixels[:40, :40] = np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    item = {"text": "frames", "video": [url] * frames_per_input}
    return json.dumps({"input": [item] * inputs}).encode()


MANY_FRAMES_LIMITS = Limits(max_inputs=32, max_request_bytes=32 * ONE_MIB,
                            max_image_bytes=4 * ONE_MIB, max_image_pixels=2048 * 2048,
                            max_video_frames=16, max_request_pixels=64 * ONE_MIB)


def test_the_request_pixel_budget_is_checked_before_decoding(monkeypatch) -> None:
    """32 inputs x 16 frames of 2048x2048 (each frame within the per-image limits) is a 413
    from the image headers: no frame is decoded."""
    from PIL import ImageFile

    body = _many_frames_body()
    assert 8 * ONE_MIB < len(body) < 16 * ONE_MIB

    def no_decode(self, *args, **kwargs):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    with pytest.raises(RequestError) as err:
        parse_request(body, MANY_FRAMES_LIMITS, "tiny")
    assert err.value.status == 413 and err.value.field.startswith("input[")
    assert "max_request_pixels" in err.value.message


def test_a_many_frame_request_is_refused_fast_while_a_small_one_succeeds(replica) -> None:
    import dataclasses

    replica.options = dataclasses.replace(replica.options, limits=MANY_FRAMES_LIMITS)
    body = _many_frames_body()

    async def scenario():
        start = time.monotonic()
        big = asyncio.ensure_future(replica(_request(body)))
        small = asyncio.ensure_future(replica(_request(_embed_body(["a small one"]))))
        big_answer = await big
        return time.monotonic() - start, big_answer, await small

    elapsed, big, small = asyncio.run(scenario())
    assert _answer(big)[0] == 413 and elapsed < 2.0
    assert _answer(small)[0] == 200


@pytest.mark.parametrize("fmt", ["EPS", "TIFF"])
def test_other_formats_sent_as_png_are_415_without_their_decoder(fmt: str,
                                                                 monkeypatch) -> None:
    from PIL import EpsImagePlugin, TiffImagePlugin

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(buffer, format=fmt)

    def forbidden(self, *args, **kwargs):
        raise AssertionError(f"the {fmt} decoder ran")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", forbidden)
    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "_open", forbidden)
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    with pytest.raises(RequestError) as err:
        parse_request(_embed_body([{"image": url}]), LIMITS, "tiny")
    assert (err.value.status, err.value.field) == (415, "input[0].image")
    assert fmt in err.value.message


def test_deep_json_is_a_400() -> None:
    with pytest.raises(RequestError) as err:
        parse_request(b"[" * 200_000 + b"]" * 200_000, LIMITS, "tiny")
    assert (err.value.status, err.value.field) == (400, "body")


def test_a_slow_body_is_a_408(replica) -> None:
    import dataclasses

    replica.options = dataclasses.replace(replica.options, body_timeout_s=0.5)

    async def trickle():
        yield b'{"input": '
        await asyncio.sleep(3600)

    async def scenario():
        return await asyncio.wait_for(replica(_request(chunks=trickle())), 5)

    start = time.monotonic()
    status, body = _answer(asyncio.run(scenario()))
    assert (status, body["error"]["param"]) == (408, "body")
    assert time.monotonic() - start < 2


def test_a_slow_request_is_a_504(replica, monkeypatch) -> None:
    import dataclasses

    real = replica.embedder.disc
    replica.options = dataclasses.replace(replica.options, request_timeout_s=0.5)

    def slow(sides):
        time.sleep(1.5)
        return real(sides)

    monkeypatch.setattr(replica.embedder, "disc", slow)

    async def scenario():
        return await asyncio.wait_for(replica(_request(_embed_body(["slow"]))), 10)

    assert _answer(asyncio.run(scenario()))[0] == 504


def test_past_max_queued_requests_is_a_503_with_retry_after(replica) -> None:
    import dataclasses

    replica.options = dataclasses.replace(replica.options, max_queued_requests=2)

    async def scenario():
        return await asyncio.gather(*(replica(_request(_embed_body([f"q {i}"])))
                                      for i in range(4)))

    responses = asyncio.run(scenario())
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 200, 503, 503]
    assert all(r.headers["retry-after"] == "1" for r in responses if r.status_code == 503)


def test_api_key_and_content_type(replica) -> None:
    import dataclasses
    import hashlib

    replica.options = dataclasses.replace(
        replica.options, api_key_sha256=hashlib.sha256(b"s3cret").hexdigest())

    def status(**kwargs) -> int:
        return asyncio.run(replica(_request(**kwargs))).status_code

    good = {"authorization": "Bearer s3cret"}
    assert status(body=_embed_body(["x"])) == 401
    assert status(body=_embed_body(["x"]), headers={"authorization": "Bearer wrong"}) == 401
    assert status(body=_embed_body(["x"]), headers=good) == 200
    assert status(method="GET", path="/v1/models") == 401
    assert status(method="GET", path="/health") == 200  # probes carry no key
    assert status(body=_embed_body(["x"]), headers={**good, "content-type": "text/plain"}) == 415


def test_check_health_fails_when_the_model_does(replica, monkeypatch) -> None:
    asyncio.run(replica.check_health())
    status, body = _answer(asyncio.run(replica(_request(method="GET", path="/health"))))
    assert status == 200 and body["health"]["state"] == "healthy"

    def broken(sides):
        raise RuntimeError("engine gone")

    monkeypatch.setattr(replica.embedder, "disc", broken)
    with pytest.raises(RuntimeError):
        asyncio.run(replica.check_health())
    status, body = _answer(asyncio.run(replica(_request(method="GET", path="/health"))))
    assert status == 503 and body["status"] == "unhealthy"
    assert body["health"]["state"] == "unhealthy"


def test_check_health_fails_when_only_generation_does(replica, monkeypatch) -> None:
    """Disc still answers but generate raises: the replica is unhealthy. The gen step asks
    for a few new tokens, not the serving budget."""
    budgets: list[int | None] = []
    real = replica.embedder.gen

    def spy(sides, samples, max_new_tokens=None):
        budgets.append(max_new_tokens)
        return real(sides, samples, max_new_tokens)

    monkeypatch.setattr(replica.embedder, "gen", spy)
    asyncio.run(replica.check_health())
    assert budgets and all(b is not None and b < MAX_NEW_TOKENS for b in budgets)

    def broken(*args, **kwargs):
        raise RuntimeError("generate is broken")

    monkeypatch.setattr(replica.embedder, "gen", broken)
    with pytest.raises(RuntimeError):
        asyncio.run(replica.check_health())
    status, body = _answer(asyncio.run(replica(_request(method="GET", path="/health"))))
    assert status == 503 and body["health"]["state"] == "unhealthy"


# ---------------------------------------------------------------------------------------------
# The same guarantees over HTTP, through both ways in (TLS and the API key on both).


@pytest.mark.parametrize("mode", ["disc", "gen", "auto"])
def test_a_poisoned_request_fails_alone_over_http(service, mode: str) -> None:
    """Seven clean requests and a poisoned one at once (one batch): 7 x 200 and one 400."""
    poisons = ["a \ud800 b", "a <|image_pad|> b", "a <|video_pad|> b"]

    def one(text: str):
        return _post(service, json.dumps({"input": [text], "mode": mode}).encode())

    for poison in poisons:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(one, [f"clean text {i}" for i in range(7)] + [poison]))
        assert [s for s, _ in answers[:7]] == [200] * 7, poison
        assert answers[7] == (400, "input[0].text"), poison


def _connect(url: str, cert: Path, timeout_s: float = 30.0):
    import ssl
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    raw = socket.create_connection((parts.hostname, parts.port), timeout=timeout_s)
    return ssl.create_default_context(cafile=str(cert)).wrap_socket(
        raw, server_hostname=parts.hostname)


def _status_of(sock) -> int:
    head = b""
    while b"\r\n" not in head:
        part = sock.recv(4096)
        if not part:
            break
        head += part
    return int(head.split(b" ", 2)[1])


def _answered(sock) -> int | None:
    """The status line's code if the server has answered already, else None (a non-blocking
    read: TLS session tickets make the raw socket readable with no answer in it)."""
    import ssl

    sock.setblocking(False)
    try:
        head = sock.recv(4096)
    except (ssl.SSLWantReadError, BlockingIOError):
        return None
    finally:
        sock.setblocking(True)
    return int(head.split(b" ", 2)[1]) if head else None


def test_a_chunked_upload_is_a_413_before_it_is_all_sent(service, service_urls) -> None:
    sock = _connect(service, service_urls["cert"])
    sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\n"
                 b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b" " * (64 << 10)
    sent, total, status = 0, 200 * ONE_MIB, None
    try:
        while sent < total and status is None:
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
            status = _answered(sock)  # the answer may come before the body ends
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass  # the server closed on us: the answer is still readable
    try:
        assert (status or _status_of(sock)) == 413
    finally:
        sock.close()
    assert sent < 64 * ONE_MIB  # the limit is 1 MiB; the rest is what buffers held


def _send_until_answered(sock, head: bytes, body: bytes) -> int:
    """Sends a request's body in pieces, stopping when the server answers (it may answer,
    and close, before the body ends); the answer's status."""
    status = None
    try:
        sock.sendall(head)
        for start in range(0, len(body), 64 << 10):
            sock.sendall(body[start:start + (64 << 10)])
            status = _answered(sock)
            if status is not None:
                break
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass  # the server closed on us: the answer is still readable
    return status or _status_of(sock)


def test_a_many_frame_request_is_refused_fast_over_http(service, service_urls) -> None:
    """An 11 MiB many-frame request (over this module's 1 MiB body limit) and a small body of
    4 inputs x 4 frames of 160x160 (over its max_request_pixels) are 413s within 2 s each,
    while a small request sent beside them gets its 200."""
    big = _many_frames_body()
    frame = io.BytesIO()
    Image.new("RGB", (160, 160)).save(frame, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(frame.getvalue()).decode()
    pixels = json.dumps({"input": [{"text": "f", "video": [url] * 4}] * 4}).encode()
    assert 11 * ONE_MIB <= len(big) and len(pixels) < LIMITS.max_request_bytes

    def refuse_big() -> tuple[int, float]:
        start = time.monotonic()
        sock = _connect(service, service_urls["cert"])
        try:
            status = _send_until_answered(sock, (
                b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nAuthorization: Bearer "
                + API_KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(big)), big)
        finally:
            sock.close()
        return status, time.monotonic() - start

    def refuse_pixels() -> tuple[tuple[int, str], float]:
        start = time.monotonic()
        return _post(service, pixels), time.monotonic() - start

    with ThreadPoolExecutor(3) as pool:
        small = pool.submit(_post, service, json.dumps({"input": ["a small one"]}).encode())
        by_bytes, by_pixels = pool.submit(refuse_big), pool.submit(refuse_pixels)
        (big_status, big_s), ((pixel_status, field), pixel_s) = (by_bytes.result(),
                                                                 by_pixels.result())
        assert small.result()[0] == 200
    assert big_status == 413 and big_s < 2.0
    assert (pixel_status, pixel_s < 2.0) == (413, True) and field.startswith("input[")


def test_a_trickling_body_is_a_408(service, service_urls) -> None:
    sock = _connect(service, service_urls["cert"])
    start = time.monotonic()
    try:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\n"
                     b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
                     b"Content-Length: 100\r\n\r\n" + b'{"input": ')
        assert _status_of(sock) == 408
    finally:
        sock.close()
    assert time.monotonic() - start < 15  # serve.body_timeout_s=2 here


def test_keys_and_content_type_over_http(service) -> None:
    body = json.dumps({"input": ["x"]}).encode()
    assert _post(service, body)[0] == 200  # the key from $UMERL_API_KEY
    keyless = EmbeddingClient(service, api_key="")
    with pytest.raises(ServiceError) as err:
        keyless.embed(["x"])
    assert err.value.status == 401
    with pytest.raises(ServiceError) as err:
        EmbeddingClient(service, api_key="wrong").models()
    assert err.value.status == 401
    assert keyless.health()["status"] == "ok"  # /health stays open for probes
    import http.client
    import ssl
    from urllib.parse import urlsplit

    parts = urlsplit(service)
    conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=30,
                                       context=ssl.create_default_context())
    conn.request("POST", "/v1/embeddings", body=body,
                 headers={"Content-Type": "text/plain", "Authorization": f"Bearer {API_KEY}"})
    assert conn.getresponse().status == 415
    conn.close()


def test_plain_http_to_a_tls_port_gets_no_answer(service) -> None:
    with pytest.raises((OSError, ServiceError)):
        EmbeddingClient(service.replace("https://", "http://"), timeout_s=10).health()


def _gen_batches(service_urls) -> list[list[str]]:
    """The texts of each gen batch the service has run (serve_faults logs them)."""
    path = service_urls["faults"] / "gen_batches.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s} s")
        time.sleep(0.05)


def test_past_max_queued_requests_is_a_503_over_http(service, service_urls) -> None:
    """QUEUE_LIMIT gen requests held by the replica (the first one's batch sleeps 3 s, the
    others wait behind it): one more is the replica's 503 with Retry-After; the held ones are
    then served."""
    first_text = f"hold the queue {uuid.uuid4().hex} [[sleep 3]]"

    def send(text: str):
        return EmbeddingClient(service, retries=0).embed([text], mode="gen")

    probe = EmbeddingClient(service)
    with ThreadPoolExecutor(QUEUE_LIMIT) as pool:
        first = pool.submit(send, first_text)
        _wait_for(lambda: any(first_text in b for b in _gen_batches(service_urls)), 10,
                  "the sleeping batch")
        held = [pool.submit(send, f"held {i}") for i in range(QUEUE_LIMIT - 1)]
        _wait_for(lambda: probe.health()["in_flight"] >= QUEUE_LIMIT, 3, "requests held")
        with pytest.raises(ServiceError) as err:
            EmbeddingClient(service, retries=0).embed(["one too many"])
        answers = [f.result() for f in [first, *held]]
    assert (err.value.status, err.value.field, err.value.retry_after_s) == (503, "server", 1.0)
    assert [a.modes for a in answers] == [["gen"]] * QUEUE_LIMIT


def test_a_request_past_request_timeout_is_a_504_over_http(service) -> None:
    """A gen batch that sleeps a second past serve.request_timeout_s: a 504 at the limit."""
    start = time.monotonic()
    with pytest.raises(ServiceError) as err:
        EmbeddingClient(service, retries=0).embed(
            [f"too slow {uuid.uuid4().hex} [[sleep {REQUEST_TIMEOUT_S + 1}]]"], mode="gen")
    elapsed = time.monotonic() - start
    assert (err.value.status, err.value.field) == (504, "server")
    assert REQUEST_TIMEOUT_S <= elapsed < REQUEST_TIMEOUT_S + 4


def test_a_caller_leaving_a_shared_gen_batch_over_http(service, service_urls, media,
                                                       tiny_bundle) -> None:
    """Three callers with images share a gen batch that runs 1.5 s before it reads the images;
    one disconnects 1 s in. The other two get the in-process embeddings, from that one batch
    (had its images gone with it, the batch would fail and its inputs be retried alone)."""
    tag = uuid.uuid4().hex
    leaver = f"what is blue? {tag} [[sleep 1.5]]"
    kept = {name: f"what is {name}? {tag}" for name in ("red", "small")}
    body = json.dumps({"input": [image_input(media["blue"], leaver)], "mode": "gen"}).encode()
    sock = _connect(service, service_urls["cert"])
    with ThreadPoolExecutor(2) as pool:
        sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: application/json\r\nAuthorization: Bearer "
                     + API_KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        answers = [pool.submit(EmbeddingClient(service).embed,
                               [image_input(media[name], text)], mode="gen")
                   for name, text in kept.items()]
        _wait_for(lambda: any(leaver in b for b in _gen_batches(service_urls)), 10,
                  "the shared batch")
        time.sleep(1.0)
        sock.close()  # the caller goes away while the batch runs
        vectors = np.concatenate([a.result().vectors for a in answers])
    greedy = SamplingParams(max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    sides = [Side(text=text, images=(str(media[name]),)) for name, text in kept.items()]
    expected = gen_embeddings(tiny_bundle, TransformersEngine(tiny_bundle), sides, 1, greedy)
    np.testing.assert_allclose(vectors, expected.embeddings[:, 0].numpy(), atol=1e-5)
    with_kept = [b for b in _gen_batches(service_urls) if set(kept.values()) & set(b)]
    assert len(with_kept) == 1 and leaver in with_kept[0]  # one batch, no per-input retry
    assert set(kept.values()) <= set(with_kept[0])


def test_the_client_follows_a_real_replica_restart(service_urls, inputs, tiny_bundle) -> None:
    """The replica's process is killed: Ray starts another, which takes another direct port
    (Serve quarantines a released one). A client of the old direct URL with proxy_url follows
    to the new one and gets the in-process embeddings. Last of the HTTP tests: the direct URL
    of the module's service is stale after it."""
    import psutil

    proxy, stale = service_urls["proxy"], service_urls["direct"]
    before = EmbeddingClient(proxy).health()["replica"]
    replicas = [p for p in psutil.Process(service_urls["process"].pid).children(recursive=True)
                if "ServeReplica" in " ".join(p.cmdline())]
    assert len(replicas) == 1
    replicas[0].kill()
    replicas[0].wait(30)

    def replaced() -> bool:
        try:
            urls = EmbeddingClient(proxy, timeout_s=10, retries=0).models()["direct_urls"]
        except (ServiceError, OSError):
            return False  # the proxy has no replica to ask yet
        return bool(urls) and stale not in urls

    _wait_for(replaced, 180, "a new replica on a new direct port")
    client = EmbeddingClient(stale, proxy_url=proxy)
    got = client.embed([x for x, _ in inputs]).vectors
    np.testing.assert_allclose(got, disc_embeddings(tiny_bundle, [s for _, s in inputs]).numpy(),
                               atol=1e-5)
    assert client.base_url != stale
    assert client.base_url in EmbeddingClient(proxy).models()["direct_urls"]
    assert EmbeddingClient(client.base_url).health()["replica"] != before


def test_the_client_retries_503_after_retry_after() -> None:
    """A stub server sheds twice, then answers: the client waits out Retry-After and gets it."""
    import http.server
    import threading

    answers = [(503, {"Retry-After": "0.2"}), (503, {"Retry-After": "0.2"}), (200, {})]
    seen: list[float] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            seen.append(time.monotonic())
            status, headers = answers[min(len(seen) - 1, 2)]
            payload = json.dumps({"status": "ok"} if status == 200 else
                                 {"error": {"message": "busy", "param": "server"}}).encode()
            self.send_response(status)
            for k, v in {**headers, "Content-Length": str(len(payload))}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert EmbeddingClient(url, api_key="").health() == {"status": "ok"}
        assert len(seen) == 3 and seen[1] - seen[0] >= 0.2 and seen[2] - seen[1] >= 0.2
        seen.clear()
        answers[2] = (503, {})
        with pytest.raises(ServiceError) as err:
            EmbeddingClient(url, api_key="", retries=1, backoff_s=0.01).health()
        assert err.value.status == 503 and len(seen) == 2
    finally:
        server.shutdown()
        server.server_close()


def test_direct_urls_are_read_off_the_controllers_target_groups() -> None:
    """Only this application's HTTP targets in the direct port range; a wildcard host is
    replaced by each replica's node address."""
    group = {"app_name": APP_NAME, "protocol": "HTTP", "targets": [
        {"ip": "10.0.0.2", "port": 8101}, {"ip": "10.0.0.1", "port": 8100},
        {"ip": "10.0.0.1", "port": 8000}]}  # the proxy's port: not a replica's own
    details = {"target_groups": [group, {**group, "protocol": "gRPC"},
                                 {**group, "app_name": "other"}]}
    local = ServeOptions(host="127.0.0.1", direct_port=8100)
    assert direct_urls_from(details, local) == ("http://127.0.0.1:8100", "http://127.0.0.1:8101")
    everywhere = ServeOptions(host="0.0.0.0", direct_port=8100)
    assert direct_urls_from(details, everywhere) == ("http://10.0.0.1:8100",
                                                     "http://10.0.0.2:8101")
    assert direct_urls_from(details, ServeOptions(direct_port=None)) == ()


def _stub_server(answers: dict[str, dict], seen: list[tuple[int, str]]):
    """A JSON-answering HTTP server on a free port: GET path -> body; it records (port,
    path) for each request."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            seen.append((self.server.server_address[1], self.path))
            payload = json.dumps(answers[self.path]).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_the_client_follows_a_restarted_replica_to_its_new_url() -> None:
    """The direct URL's replica is gone (nothing listens there): the client re-reads the live
    direct URLs from the proxy, answers from the new one and stays there."""
    seen: list[tuple[int, str]] = []
    live = _stub_server({"/health": {"status": "ok"}}, seen)
    live_url = f"http://127.0.0.1:{live.server_address[1]}"
    proxy = _stub_server({"/v1/models": {"object": "list", "data": [],
                                         "direct_urls": [live_url]}}, seen)
    proxy_url = f"http://127.0.0.1:{proxy.server_address[1]}"
    stale = f"http://127.0.0.1:{_free_port()}"
    try:
        with pytest.raises(ConnectionError):  # without the proxy: the error as before
            EmbeddingClient(stale, api_key="", timeout_s=5).health()
        client = EmbeddingClient(stale, api_key="", timeout_s=5, proxy_url=proxy_url)
        assert client.health() == {"status": "ok"} and client.health() == {"status": "ok"}
        assert client.base_url == live_url
        assert seen == [(proxy.server_address[1], "/v1/models"),
                        (live.server_address[1], "/health"), (live.server_address[1], "/health")]
    finally:
        for server in (live, proxy):
            server.shutdown()
            server.server_close()


def test_print_config_is_a_serve_deploy_config(tiny_model_dir, router_file, monkeypatch) -> None:
    """`umerl serve CKPT --print-config`: a config Ray Serve's own schema accepts, whose
    application builder rebuilds the same deployment (autoscaling, limits, key digest)."""
    import hashlib
    import os

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from umerl.serve.service import app

    overrides = ["serve.autoscaling.enabled=true", "serve.autoscaling.max_replicas=3",
                 "serve.max_queued_requests=7", "serve.port=8223"]
    env = {**os.environ, "UMERL_API_KEY": "k3y"}
    out = subprocess.run([sys.executable, "-m", "umerl.cli", "serve", str(tiny_model_dir),
                          "--router", str(router_file), "--print-config", *overrides],
                         capture_output=True, text=True, env=env, timeout=120, check=True)
    config = yaml.safe_load(out.stdout)
    ServeDeploySchema.model_validate(config)
    application = config["applications"][0]
    assert application["import_path"] == "umerl.serve.service:app"
    assert config["http_options"]["port"] == 8223
    deployment = application["deployments"][0]
    assert deployment["autoscaling_config"]["max_replicas"] == 3
    assert "num_replicas" not in deployment and deployment["max_queued_requests"] == 7
    assert application["args"]["api_key_sha256"] == hashlib.sha256(b"k3y").hexdigest()
    assert "k3y" not in out.stdout
    monkeypatch.delenv("UMERL_API_KEY", raising=False)
    built = app(application["args"])
    options = built._bound_deployment._deployment_config
    assert options.autoscaling_config.max_replicas == 3
    assert options.max_queued_requests == 7
    service_options = built._bound_deployment.init_args[1]
    assert service_options.api_key_sha256 == hashlib.sha256(b"k3y").hexdigest()


# ---------------------------------------------------------------------------------------------
# On a Ray of this process: the printed config deployed as `serve deploy` deploys it (the
# controller's deploy_apps, which the dashboard's REST endpoint behind `serve deploy` calls),
# then a replica whose model breaks is replaced.


def _broken_service_class(marker: Path):
    import cloudpickle

    from umerl.serve.service import EmbeddingService

    cloudpickle.register_pickle_by_value(sys.modules[__name__])

    class BrokenFirstReplica(EmbeddingService):
        """The first replica's model raises on every call; the marker file (holding its
        replica id) says one broke already, so its replacement is sound."""

        def __init__(self, *args, **kwargs):
            from ray import serve

            super().__init__(*args, **kwargs)
            if not marker.exists():
                marker.write_text(serve.get_replica_context().replica_id.unique_id)

                def broken(*_args, **_kwargs):
                    raise RuntimeError("the engine is gone")

                self.embedder.disc = broken
                self.embedder.gen = broken

    return BrokenFirstReplica


def test_a_deployed_config_serves_and_a_broken_replica_is_replaced(
        tiny_model_dir, tiny_bundle, inputs, tmp_path, monkeypatch) -> None:
    import ray
    import yaml
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from umerl.serve import service as svc

    port = _free_port()
    overrides = [f"serve.port={port}", "serve.direct_port=null", "serve.model_name=tiny",
                 f"serve.max_new_tokens={MAX_NEW_TOKENS}", "serve.health_check_period_s=1"]
    printed = subprocess.run([sys.executable, "-m", "umerl.cli", "serve", str(tiny_model_dir),
                              "--print-config", *overrides], capture_output=True, text=True,
                             timeout=120, check=True, env={**__import__("os").environ,
                                                            "UMERL_API_KEY": ""})
    config = yaml.safe_load(printed.stdout)
    # No key here: the application builder would read one from the cluster's environment.
    monkeypatch.delenv("UMERL_API_KEY", raising=False)
    ray.init(address="local", num_cpus=3, include_dashboard=False,
             object_store_memory=256 << 20, logging_level="ERROR")
    try:
        serve.start(http_options=config["http_options"])
        _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config),
                                         _blocking=True)
        url = f"http://127.0.0.1:{port}"
        client = EmbeddingClient(url, api_key="")
        got = client.embed([x for x, _ in inputs], mode="disc").vectors
        expected = disc_embeddings(tiny_bundle, [s for _, s in inputs]).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5)

        marker = tmp_path / "broke"
        options = svc.ServeOptions(port=port, direct_port=None, model_name="tiny",
                                   max_new_tokens=MAX_NEW_TOKENS, health_check_period_s=1)
        deployment = serve.deployment(_broken_service_class(marker), name="EmbeddingService")
        serve.run(deployment.options(**svc.deployment_options(options)).bind(
            str(tiny_model_dir), options, None), name=svc.APP_NAME, route_prefix="/")
        broken_id = marker.read_text()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                health = client.health()
                if health["replica"] != broken_id and health["health"]["state"] == "healthy":
                    break
            except (ServiceError, OSError):
                pass  # the broken replica's /health is a 503 until Ray replaces it
            time.sleep(0.3)
        else:
            pytest.fail("the broken replica was not replaced within 90 s")
        replicas = serve.status().applications[svc.APP_NAME].deployments["EmbeddingService"]
        assert replicas.status == "HEALTHY"
        np.testing.assert_allclose(client.embed([x for x, _ in inputs]).vectors, expected,
                                   atol=1e-5)
    finally:
        serve.shutdown()
        ray.shutdown()

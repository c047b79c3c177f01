"""Image requests through the real server (issue 7), embedded engine, tiny Qwen3-VL: the `openai`
client with image content parts (pinned, routed, streaming), `/route` and `/generate` with images,
every kind of bad image refused with a 4xx naming it, and a text-only base model refusing images."""

from __future__ import annotations

import asyncio
import base64
import io
import random
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from service.base_model import resolve_base_model
from service.errors import BadRequestError, PayloadTooLargeError
from service.multimodal import image_bytes
from service.registration import register_adapter
from service.settings import Settings
from tests.support import ServerProcess
from tests.vl_support import image_data_url, sample_image

RED, BLUE = (220, 30, 30), (30, 30, 220)
MAX_IMAGE_BYTES = 64 * 1024
MAX_PIXELS = 600 * 600


@pytest.fixture(scope="module")
def vl_server(tiny_vl: Path, vl_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("vl-server")
    settings = Settings(base_model=str(tiny_vl), registry=root / "loras.json", adapter_root=vl_adapters["alpha"].parent,
                        cache_dir=root / "cache")
    base = resolve_base_model(str(tiny_vl), settings.cache_dir)
    for name in ("alpha", "beta"):
        register_adapter(settings, base, "task", name, vl_adapters[name])
    register_adapter(settings, base, "router", "router", vl_adapters["router"], labels=("alpha", "beta"))
    env = {"LORAMUX_BASE_MODEL": str(tiny_vl), "LORAMUX_REGISTRY": str(settings.registry),
           "LORAMUX_ADAPTER_ROOT": str(settings.adapter_root), "LORAMUX_CACHE_DIR": str(settings.cache_dir),
           "LORAMUX_MAX_MODEL_LEN": "1024", "LORAMUX_MAX_IMAGES": "2",
           "LORAMUX_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES), "LORAMUX_MAX_IMAGE_PIXELS": str(MAX_PIXELS)}
    server = ServerProcess(env).start(root / "server.log")
    yield server.url
    server.stop()


def image_chat(*urls: str, text: str = "What should handle this screen?") -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def png_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def encoded(image: Any, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_openai_client_pinned_routed_and_streaming_with_images(vl_server: str) -> None:
    client = openai.OpenAI(base_url=f"{vl_server}/v1", api_key="unused", max_retries=0, timeout=120)
    red, blue = image_data_url(sample_image(RED)), image_data_url(sample_image(BLUE, mark=1))
    answers = {}
    for name, url in (("red", red), ("blue", blue)):
        done = client.chat.completions.create(model="alpha", messages=image_chat(url), max_tokens=6, temperature=0)
        assert done.model == "alpha" and done.choices[0].finish_reason == "length"
        assert done.usage.completion_tokens == 6
        answers[name] = done.choices[0].message.content
    assert answers["red"] != answers["blue"], "the image did not reach the model"

    raw = client.chat.completions.with_raw_response.create(model="auto", messages=image_chat(red), max_tokens=4,
                                                           temperature=0)
    routed = raw.parse()
    assert routed.model in {"alpha", "beta"} and raw.headers["x-loramux-adapter"].startswith(routed.model)

    chunks = list(client.chat.completions.create(model="beta", messages=image_chat(blue), max_tokens=5,
                                                 temperature=0, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(model="beta", messages=image_chat(blue), max_tokens=5, temperature=0)
    assert streamed == whole.choices[0].message.content


def test_route_and_generate_see_the_image(vl_server: str) -> None:
    probabilities = []
    for color in (RED, BLUE):
        body = httpx.post(f"{vl_server}/route", json={"messages": image_chat(image_data_url(sample_image(color)))},
                          timeout=60).json()
        assert body["router"] == {"name": "router", "version": 1}
        probabilities.append({c["adapter"]: c["probability"] for c in body["candidates"]})
    assert probabilities[0]["alpha"] != pytest.approx(probabilities[1]["alpha"], abs=1e-6)

    text_only = httpx.post(f"{vl_server}/route", json={"prompt": "What should handle this screen?"}, timeout=60)
    assert text_only.status_code == 200  # text requests keep working on a vision-language base model
    generated = httpx.post(f"{vl_server}/generate", timeout=60, json={
        "messages": image_chat(image_data_url(sample_image(RED))), "max_tokens": 3})
    assert generated.status_code == 200, generated.text
    assert generated.json()["adapter"] in {"alpha", "beta"} and generated.json()["usage"]["completion_tokens"] == 3


BAD_IMAGES = [
    ("not an image", png_url(b"definitely not a png"), 400, "not a readable image"),
    ("invalid base64", "data:image/png;base64,@@@@", 400, "not valid base64"),
    ("not base64", "data:image/png,rawbytes", 400, "must be base64"),
    ("wrong media type", png_url(b"x", "text/plain"), 400, "unsupported image type"),
    ("file scheme", "file:///etc/passwd", 400, "unsupported image URL scheme 'file'"),
    ("ftp scheme", "ftp://example.com/a.png", 400, "unsupported image URL scheme 'ftp'"),
    ("http not allowed", "http://127.0.0.1:9/a.png", 400, "not fetched by this server"),
    ("too many bytes", png_url(bytes(MAX_IMAGE_BYTES + 10)), 413, "larger than"),
]


@pytest.mark.parametrize(("case", "url", "status", "message"), BAD_IMAGES, ids=[c[0] for c in BAD_IMAGES])
def test_bad_images_are_refused_with_a_4xx(vl_server: str, case: str, url: str, status: int, message: str) -> None:
    for path, body in (("/v1/chat/completions", {"model": "alpha", "messages": image_chat(url)}),
                       ("/route", {"messages": image_chat(url)}),
                       ("/generate", {"messages": image_chat(url), "adapter": "alpha"})):
        response = httpx.post(f"{vl_server}{path}", json=body, timeout=60)
        assert response.status_code == status, (path, response.text)
        error = response.json()["error"]
        assert message in error["message"] and error["param"] == "messages.0.content.0.image_url.url", error
    assert httpx.get(f"{vl_server}/ready", timeout=10).status_code == 200


def test_too_many_pixels_and_too_many_images(vl_server: str) -> None:
    big = png_url(encoded(sample_image(RED, size=(700, 700))))
    response = httpx.post(f"{vl_server}/route", json={"messages": image_chat(big)}, timeout=60)
    assert response.status_code == 413 and "700x700" in response.json()["error"]["message"]
    small = image_data_url(sample_image(RED))
    response = httpx.post(f"{vl_server}/route", json={"messages": image_chat(small, small, small)}, timeout=60)
    assert response.status_code == 400 and "at most 2 images" in response.json()["error"]["message"]
    audio = {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}
    unknown_part = [{"role": "user", "content": [audio]}]
    response = httpx.post(f"{vl_server}/route", json={"messages": unknown_part}, timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"].startswith("messages.0.content")


def test_a_text_only_base_model_refuses_images(server) -> None:
    response = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        "model": "auto", "messages": image_chat(image_data_url(sample_image(RED)))})
    assert response.status_code == 400
    assert "does not accept images" in response.json()["error"]["message"]


class _ImageHandler(BaseHTTPRequestHandler):
    payload = b""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        status = 200 if self.path == "/red.png" else 404
        self.send_response(status)
        self.end_headers()
        if status == 200:
            self.wfile.write(self.payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def image_site() -> Iterator[str]:
    from PIL import Image

    noise = Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3))  # ~12 kB as PNG
    _ImageHandler.payload = encoded(noise)
    site = ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{site.server_address[1]}"
    site.shutdown()


def test_image_urls_are_fetched_only_when_allowed_and_within_the_limit(image_site: str) -> None:
    allowed = Settings(allow_image_urls=True)
    fetch = asyncio.run
    assert fetch(image_bytes(f"{image_site}/red.png", allowed, "p")) == _ImageHandler.payload
    with pytest.raises(BadRequestError, match="HTTP 404"):
        fetch(image_bytes(f"{image_site}/missing.png", allowed, "p"))
    with pytest.raises(PayloadTooLargeError):
        fetch(image_bytes(f"{image_site}/red.png", Settings(allow_image_urls=True, max_image_bytes=1024), "p"))
    with pytest.raises(BadRequestError, match="not fetched"):
        fetch(image_bytes(f"{image_site}/red.png", Settings(), "p"))

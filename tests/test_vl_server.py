"""Image requests through the real server (issue 7), embedded engine, tiny Qwen3-VL: the `openai`
client with image content parts (pinned, routed, streaming), `/route` and `/generate` with images,
every kind of bad image refused with a 4xx naming it, and a text-only base model refusing images."""

from __future__ import annotations

import asyncio
import base64
import io
import random
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from service.base_model import resolve_base_model
from service.errors import BadRequestError
from service.multimodal import image_bytes
from service.registration import register_adapter
from service.settings import Settings
from tests.support import ServerProcess
from tests.vl_support import image_data_url, sample_image

RED, BLUE = (220, 30, 30), (30, 30, 220)
MAX_IMAGE_BYTES = 64 * 1024
MAX_PIXELS = 600 * 600


def start_vl_server(tiny_vl: Path, vl_adapters: dict[str, Path], root: Path, env: dict[str, str]) -> ServerProcess:
    """The tiny VL model serving alpha, beta and the router over them, with `env` on top."""
    settings = Settings(base_model=str(tiny_vl), registry=root / "loras.json", adapter_root=vl_adapters["alpha"].parent,
                        cache_dir=root / "cache")
    base = resolve_base_model(str(tiny_vl), settings.cache_dir)
    for name in ("alpha", "beta"):
        register_adapter(settings, base, "task", name, vl_adapters[name])
    register_adapter(settings, base, "router", "router", vl_adapters["router"], labels=("alpha", "beta"))
    return ServerProcess({"LORAMUX_BASE_MODEL": str(tiny_vl), "LORAMUX_REGISTRY": str(settings.registry),
                          "LORAMUX_ADAPTER_ROOT": str(settings.adapter_root),
                          "LORAMUX_CACHE_DIR": str(settings.cache_dir), "LORAMUX_MAX_MODEL_LEN": "1024",
                          **env}).start(root / "server.log")


@pytest.fixture(scope="module")
def vl_server(tiny_vl: Path, vl_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = start_vl_server(tiny_vl, vl_adapters, tmp_path_factory.mktemp("vl-server"), {
        "LORAMUX_MAX_IMAGES": "2", "LORAMUX_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES),
        "LORAMUX_MAX_IMAGE_PIXELS": str(MAX_PIXELS)})
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
    assert text_only.status_code == 200, text_only.text  # text requests keep working on a vision-language base
    candidates = {c["adapter"]: c["probability"] for c in text_only.json()["candidates"]}
    assert set(candidates) == {"alpha", "beta"} and sum(candidates.values()) == pytest.approx(1, abs=1e-3)
    assert text_only.json()["adapter"] == max(candidates, key=candidates.__getitem__)
    assert all(candidates["alpha"] != pytest.approx(p["alpha"], abs=1e-6) for p in probabilities)  # no image seen
    generated = httpx.post(f"{vl_server}/generate", timeout=60, json={
        "messages": image_chat(image_data_url(sample_image(RED))), "max_tokens": 3})
    assert generated.status_code == 200, generated.text
    assert generated.json()["adapter"] in {"alpha", "beta"} and generated.json()["usage"]["completion_tokens"] == 3


def _tiff() -> bytes:
    from PIL import Image

    return encoded(Image.new("RGB", (8, 8)), "TIFF")  # Pillow reads it, the server declares no TIFF


BAD_IMAGES = [
    ("not an image", png_url(b"definitely not a png"), 400, "not a readable image"),
    ("undeclared format", png_url(_tiff()), 400, "not a readable image"),
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
        assert not re.search(r"object at|0x[0-9a-f]{6,}", error["message"]), error  # no repr of Pillow's file object
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
    seen: list[tuple[str, str | None]] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.seen.append((self.path, self.headers.get("Host")))
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
    _ImageHandler.seen = []
    site = ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{site.server_address[1]}"
    site.shutdown()


def test_image_urls_are_fetched_only_when_allowed_and_within_the_limit(image_site: str) -> None:
    local = Settings(allow_image_urls=True, image_url_allow_private=True)  # the site is on loopback
    fetch = asyncio.run
    assert fetch(image_bytes(f"{image_site}/red.png", local, "p")) == _ImageHandler.payload
    with pytest.raises(BadRequestError, match="could not be fetched"):
        fetch(image_bytes(f"{image_site}/missing.png", local, "p"))
    small = Settings(allow_image_urls=True, image_url_allow_private=True, max_image_bytes=1024)
    with pytest.raises(BadRequestError, match="could not be fetched"):  # the same words for every failure
        fetch(image_bytes(f"{image_site}/red.png", small, "p"))
    with pytest.raises(BadRequestError, match="not fetched"):
        fetch(image_bytes(f"{image_site}/red.png", Settings(), "p"))
    requests = len(_ImageHandler.seen)
    with pytest.raises(BadRequestError, match="could not be fetched"):  # public addresses only, by default
        fetch(image_bytes(f"{image_site}/red.png", Settings(allow_image_urls=True), "p"))
    assert len(_ImageHandler.seen) == requests  # refused before connecting


def test_the_fetch_connects_to_the_address_it_checked(image_site: str) -> None:
    from service.image_fetch import ImageFetcher

    port = int(image_site.rsplit(":", 1)[1])
    answers = iter([["127.0.0.1"], ["10.0.0.1"]])  # a second lookup would get another address

    async def rebinding(host: str, port: int) -> list[str]:
        return next(answers)

    fetcher = ImageFetcher(Settings(allow_image_urls=True, image_url_allow_private=True), rebinding)
    assert asyncio.run(fetcher.fetch(f"http://images.example:{port}/red.png", "p")) == _ImageHandler.payload
    assert _ImageHandler.seen == [("/red.png", f"images.example:{port}")]  # one lookup; its host kept

    async def private(host: str, port: int) -> list[str]:
        return ["93.184.216.34", "192.168.1.7"]  # one private answer is enough to refuse

    with pytest.raises(BadRequestError, match="could not be fetched"):
        asyncio.run(ImageFetcher(Settings(allow_image_urls=True), private).fetch("http://mixed.example/a.png", "p"))
    listed = Settings(allow_image_urls=True, image_url_allow_private=True, image_url_hosts=[".example"])
    assert asyncio.run(ImageFetcher(listed, lambda h, p: _answer("127.0.0.1")).fetch(
        f"http://img.example:{port}/red.png", "p")) == _ImageHandler.payload
    with pytest.raises(BadRequestError, match="could not be fetched"):
        asyncio.run(ImageFetcher(listed, lambda h, p: _answer("127.0.0.1")).fetch(f"{image_site}/red.png", "p"))


async def _answer(address: str) -> list[str]:
    return [address]


NON_PUBLIC = ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
              "224.0.0.1", "::1", "::", "fc00::1", "fd00:ec2::254", "fe80::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1",
              "2002:7f00:1::", "2002:a9fe:a9fe::"]


@pytest.mark.parametrize("address", NON_PUBLIC)
def test_non_public_addresses_are_recognised(address: str) -> None:
    import ipaddress

    from service.image_fetch import is_public

    assert not is_public(ipaddress.ip_address(address))


def test_public_addresses_are_recognised() -> None:
    import ipaddress

    from service.image_fetch import is_public

    assert all(is_public(ipaddress.ip_address(a)) for a in ("8.8.8.8", "93.184.216.34", "2606:4700::1111",
                                                           "::ffff:8.8.8.8"))


@pytest.fixture(scope="module")
def url_server(tiny_vl: Path, vl_adapters: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A vision server that fetches image URLs (`LORAMUX_ALLOW_IMAGE_URLS`), with the default guards."""
    server = start_vl_server(tiny_vl, vl_adapters, tmp_path_factory.mktemp("vl-url-server"), {
        "LORAMUX_ALLOW_IMAGE_URLS": "1", "LORAMUX_IMAGE_FETCH_TIMEOUT_S": "5"})
    yield server.url
    server.stop()


SSRF_URLS = ["http://127.0.0.1:{port}/red.png", "http://localhost:{port}/red.png", "http://[::1]:{port}/red.png",
             "http://[::ffff:127.0.0.1]:{port}/red.png", "http://2130706433:{port}/red.png",
             "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/a.png", "http://[fd00:ec2::254]/a.png",
             "http://0.0.0.0:{port}/red.png", "http://user:pw@127.0.0.1:{port}/red.png"]


def test_the_server_never_fetches_from_its_own_network(url_server: str, image_site: str) -> None:
    """Loopback, private, link-local (cloud metadata), ULA and mapped forms: one 400 with the same
    words for all, quickly (nothing is connected to), and the local site sees no request."""
    port = int(image_site.rsplit(":", 1)[1])
    messages = set()
    for template in SSRF_URLS:
        url = template.format(port=port)
        response = httpx.post(f"{url_server}/v1/chat/completions", timeout=30,
                              json={"model": "alpha", "messages": image_chat(url), "max_tokens": 1})
        assert response.status_code == 400, (url, response.text)
        error = response.json()["error"]
        assert error["param"] == "messages.0.content.0.image_url.url", error
        messages.add(error["message"])
        assert response.elapsed.total_seconds() < 4, url  # refused, not timed out
    assert len(messages) == 1 and "could not be fetched" in messages.pop()
    assert _ImageHandler.seen == []
    assert httpx.get(f"{url_server}/ready", timeout=10).status_code == 200


def test_the_default_pixel_cap_is_the_processors_own(url_server: str) -> None:
    """Without `LORAMUX_MAX_IMAGE_PIXELS` the cap is the image processor's max_pixels (512 x 512 for the
    tiny model): a bigger image, which the processor would only shrink, is not decoded at all."""
    over = png_url(encoded(sample_image(RED, size=(600, 600))))
    response = httpx.post(f"{url_server}/route", json={"messages": image_chat(over)}, timeout=60)
    assert response.status_code == 413, response.text
    assert "at most 262144 pixels" in response.json()["error"]["message"]
    at_cap = png_url(encoded(sample_image(RED, size=(512, 512))))
    routed = httpx.post(f"{url_server}/route", json={"messages": image_chat(at_cap)}, timeout=60)
    assert routed.status_code == 200, routed.text
    decision = routed.json()  # decoded and routed on: a decision over the router's names
    assert decision["adapter"] in {c["adapter"] for c in decision["candidates"]}, decision


def test_images_count_toward_the_context_before_anything_runs(url_server: str) -> None:
    """One context-length check, images counted as the tokens they expand to: an over-long image chat is a
    400 before the stream starts (not an error event inside a 200 stream), with the same token count the
    engine would see, and a router prompt whose images overflow its budget is refused before routing."""
    image = png_url(encoded(sample_image(RED, size=(512, 512))))  # 256 tokens once expanded
    body = {"model": "alpha", "messages": image_chat(image, image), "max_tokens": 600, "stream": True}
    response = httpx.post(f"{url_server}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "messages" and "600 new tokens" in error["message"], error
    found = re.search(r"prompt has (\d+) tokens", error["message"])
    assert found and 512 < int(found.group(1)) < 600, error  # both images' 256 tokens and the text
    body = {"model": "alpha", "messages": image_chat(image, image), "max_tokens": 400}  # fits: served
    served = httpx.post(f"{url_server}/v1/chat/completions", json=body, timeout=120)
    assert served.status_code == 200, served.text
    # the count the refusal gave is the count the engine ran: one rule for both
    assert served.json()["usage"]["prompt_tokens"] == int(found.group(1)), served.json()["usage"]

    four = image_chat(image, image, image, image)  # 1024 image tokens: over the router's budget (the context)
    for path, extra in (("/route", {}), ("/v1/chat/completions", {"model": "auto", "max_tokens": 1})):
        response = httpx.post(f"{url_server}{path}", json={"messages": four, **extra}, timeout=60)
        assert response.status_code == 400, (path, response.text)
        error = response.json()["error"]
        assert error["param"] == "messages" and "the router's prompt has" in error["message"], error


def test_an_image_the_processor_cannot_take_is_the_clients_error(url_server: str) -> None:
    """A 1000 x 4 strip: the Qwen-VL processor refuses sides more than 200 times apart; a 400, never a 500."""
    strip = png_url(encoded(sample_image(RED, size=(1000, 4))))
    for path, extra in (("/route", {}), ("/v1/chat/completions", {"model": "alpha", "max_tokens": 1})):
        response = httpx.post(f"{url_server}{path}", json={"messages": image_chat(strip), **extra}, timeout=60)
        assert response.status_code == 400, (path, response.text)
        assert "1000x4" in response.json()["error"]["message"]
    assert httpx.get(f"{url_server}/ready", timeout=10).status_code == 200

"""The abusive inputs of `make chaos` (loadtests/chaos.py): request bodies, images and adapter folders
that a hostile or broken client sends, each with the statuses the service may answer it with.

They live apart from the run itself so that what is sent can be read in one place: every item is
something issue 13 names (over-long prompts, image bombs, bad images, non-ASCII and reserved names,
bad adapters) and each one has an answer the README promises, never a 5xx.
"""

from __future__ import annotations

import base64
import io
import json
import pickle
import shutil
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# a 4xx that names the problem; 200 only where the README says the request is served
REFUSED = frozenset({400, 404, 413, 422})
BODY_LIMIT = 2 * 1024 * 1024  # the default LORAMUX_MAX_BODY_BYTES
NEAR_LIMIT_TEXT = "lorem ipsum dolor sit amet " * (1_500_000 // 27)  # ~1.5 MB: under the body limit
OVER_CONTEXT_TEXT = "word " * 3000  # ~3000 tokens: over the default 2048-token context, a small body
OVER_LIMIT_TEXT = "x" * (BODY_LIMIT + 65536)  # over the body limit: 413 before it is parsed


@dataclass(frozen=True)
class Abuse:
    """One abusive HTTP request: what it is called in the report, where it goes, what it may get."""

    label: str
    path: str
    payload: dict[str, Any]
    expected: frozenset[int] = REFUSED
    admin: bool = False
    method: str = "POST"
    may_drop: bool = False  # the server may answer before reading the whole body and close: no status


def chat(content: Any, model: str = "auto", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **extra}


def oversize_requests(adapter: str) -> list[Abuse]:
    """Over-long prompts to every endpoint: ~1.5 MB of text (read, then judged on its tokens; /route
    routes on the start of the turn, so a 200 is right there), more tokens than the context, a
    `max_tokens` beyond the limit, prompt plus `max_tokens` past the context, and a body over the limit."""
    near, over_ctx = NEAR_LIMIT_TEXT, OVER_CONTEXT_TEXT
    routed = REFUSED | {200}
    return [
        Abuse("route 1.5 MB prompt", "/route", {"prompt": near}, routed),
        Abuse("generate 1.5 MB prompt", "/generate", {"prompt": near, "max_tokens": 8}),
        Abuse("chat 1.5 MB prompt", "/v1/chat/completions", chat(near)),
        Abuse("route 3000 tokens", "/route", {"messages": [{"role": "user", "content": over_ctx}]}, routed),
        Abuse("generate 3000 tokens", "/generate", {"prompt": over_ctx, "adapter": adapter, "max_tokens": 8}),
        Abuse("chat 3000 tokens", "/v1/chat/completions", chat(over_ctx)),
        Abuse("generate max_tokens 100000", "/generate", {"prompt": "hi", "max_tokens": 100000}),
        Abuse("chat prompt + max_tokens over context", "/v1/chat/completions",
              chat("word " * 1500, adapter, max_tokens=1000)),
        Abuse("generate body over the limit", "/generate", {"prompt": OVER_LIMIT_TEXT}, may_drop=True),
        Abuse("chat streamed 1.5 MB prompt", "/v1/chat/completions", chat(near, stream=True)),
    ]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(side: int = 100_000) -> bytes:
    """A decompression bomb: a valid PNG header declaring side x side pixels (10^10 for the
    default) over a few bytes of deflate stream; a decoder that trusts it allocates tens of GB."""
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 65536, 9)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def real_image(fmt: str, size: int = 64) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (size, size), (200, 30, 30)).save(out, format=fmt)
    return out.getvalue()


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def image_requests() -> list[Abuse]:
    """Image bombs and bad images on every endpoint. The default base model is text-only, so every
    image is a 400 there; on a vision-language model each is a 400 or 413 naming the image."""
    png = real_image("PNG")
    images = {
        "bomb PNG header 100000x100000": data_url(bomb_png()),
        "truncated PNG": data_url(png[: len(png) // 2]),
        "TIFF labelled png": data_url(real_image("TIFF"), "image/png"),
        "not base64": "data:image/png;base64,@@@not-base64@@@",
        "svg data URL": data_url(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml"),
        "file URL": "file:///etc/passwd",
        "loopback URL": "http://127.0.0.1:1/x.png",
        "1.8 MB PNG": data_url(b"\x89PNG\r\n\x1a\n" + b"\x00" * 1_300_000),
    }
    out: list[Abuse] = []
    for i, (label, url) in enumerate(images.items()):
        content = [image_part(url), {"type": "text", "text": "what is in this picture?"}]
        messages = [{"role": "user", "content": content}]
        path, payload = [("/v1/chat/completions", chat(content)), ("/generate", {"messages": messages}),
                         ("/route", {"messages": messages})][i % 3]
        out.append(Abuse(f"{path} {label}", path, payload))
    many = [image_part(data_url(png)) for _ in range(20)] + [{"type": "text", "text": "hi"}]
    out.append(Abuse("/v1/chat/completions 20 images", "/v1/chat/completions", chat(many)))
    return out


NON_ASCII_NAMES = ("ünï", "日本語", "emoji-🙂", "rtl-\u202egnp", "nul\u0000byte", "cr\r\nlf", "Auto", "BASE", "auto ",
                   "a" * 65, "../alpha", "x" * 5000)
RESERVED_NAMES = ("auto", "base", "Base", "AUTO")


def name_requests(adapter_path: str) -> list[Abuse]:
    """Non-ASCII and reserved names where a request names an adapter, and in admin registrations
    of a good adapter folder (only the name is wrong). `auto` in a request means "route", so a 200
    is right there; a registration under any of these names must be refused."""
    out: list[Abuse] = []
    for i, name in enumerate(NON_ASCII_NAMES):
        if i % 2:
            out.append(Abuse(f"chat model {name[:12]!r}", "/v1/chat/completions", chat("hi", name)))
        else:
            out.append(Abuse(f"generate adapter {name[:12]!r}", "/generate",
                             {"prompt": "hi", "adapter": name, "max_tokens": 4}))
    for name in RESERVED_NAMES:
        out.append(Abuse(f"generate adapter {name!r}", "/generate", {"prompt": "hi", "adapter": name, "max_tokens": 4},
                         REFUSED | {200}))
    for name in (*NON_ASCII_NAMES, *RESERVED_NAMES, ""):
        out.append(Abuse(f"admin register {name[:12]!r}", "/admin/adapters", {"name": name, "path": adapter_path},
                         admin=True))
    for name in ("ünï", "auto", "%00", "..%2F..%2Fetc"):
        out.append(Abuse(f"admin activate {name!r}", f"/admin/adapters/{name}/activate", {}, admin=True))
    return out


@dataclass
class BadAdapter:
    """An adapter folder the validation must refuse (422), registered through the admin API."""

    label: str
    path: str  # as sent: relative to the adapter root, or absolute
    folder: Path | None = field(default=None)


def _edit_config(folder: Path, **changes: Any) -> None:
    config_file = folder / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config.update(changes)
    config_file.write_text(json.dumps(config, indent=2))


def build_bad_adapters(good: Path, root: Path, outside: Path) -> list[BadAdapter]:
    """Copies of a real adapter folder, each broken one way: DoRA, null config fields, a pickle
    `.bin` instead of safetensors, and three ways out of the adapter root."""
    made: list[BadAdapter] = []

    def copy(name: str) -> Path:
        folder = root / "chaos-bad" / name
        if folder.exists():
            shutil.rmtree(folder)
        shutil.copytree(good, folder)
        made.append(BadAdapter(name, f"chaos-bad/{name}", folder))
        return folder

    _edit_config(copy("dora"), use_dora=True)
    _edit_config(copy("lora-alpha-null"), lora_alpha=None)
    _edit_config(copy("r-null"), r=None)
    _edit_config(copy("target-modules-null"), target_modules=None)
    pickled = copy("pickle-bin")
    (pickled / "adapter_model.safetensors").unlink()
    # a real pickle (harmless: a dict of lists), where safetensors weights belong
    (pickled / "adapter_model.bin").write_bytes(pickle.dumps({"base_model.lora_A.weight": [[0.0] * 8] * 8}))
    _edit_config(copy("modules-to-save"), modules_to_save=["lm_head"])
    if outside.exists():
        shutil.rmtree(outside)
    shutil.copytree(good, outside)
    made.append(BadAdapter("outside the root (absolute)", str(outside)))
    made.append(BadAdapter("outside the root (..)", f"chaos-bad/../../{outside.parent.name}/{outside.name}"))
    link = root / "chaos-bad" / "escape"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(outside, target_is_directory=True)
    made.append(BadAdapter("symlink out of the root", "chaos-bad/escape"))
    return made

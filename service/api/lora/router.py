"""vLLM's runtime LoRA endpoints, as aliases of the admin API: `POST /v1/load_lora_adapter` is
`POST /admin/adapters` (validated, versioned, path below the adapter root, candidate -> load ->
activate) and `POST /v1/unload_lora_adapter` is `DELETE /admin/adapters/NAME` (retired, history
kept, restorable), through the very same functions. A vLLM user's script (load, chat with
`model=lora_name`, unload) runs unchanged.

Authorization is the admin API's: an admin key, closed by default (`ClosedByDefaultRoute`, and the
auth guard treats these two paths as admin paths). Success is answered as vLLM's server answers it
(200, the plain-text `Success: ...` sentence); errors are our one error body, their
`param` named after vLLM's fields. vLLM's own refusals are kept: loading a name that is serving
without `load_inplace` is a 400 (with it, a new version replaces the serving one), a name that
collides with the base model is a 400, unloading a name that is not serving is a 404.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from service.api.admin.router import ClosedByDefaultRoute, RegisterRequest, register_version, retire
from service.api.deps import AdminAuth, State
from service.api.lora.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from service.errors import AdapterNotFoundError, BadRequestError, LoramuxError

LOAD_PATH = "/v1/load_lora_adapter"
UNLOAD_PATH = "/v1/unload_lora_adapter"
VLLM_PARAMS = {"name": "lora_name", "path": "lora_path"}

# documented beside the default JSON (errors stay JSON: a route-wide response class would retype them)
TEXT_200 = {200: {"content": {"text/plain": {"schema": {"type": "string"}}}}}

router = APIRouter(tags=["admin"], dependencies=[AdminAuth], route_class=ClosedByDefaultRoute)


@contextmanager
def vllm_fields() -> Iterator[None]:
    """The admin API's refusals name its fields (`name`, `path`); here the client sent vLLM's."""
    try:
        yield
    except LoramuxError as exc:
        exc.param = VLLM_PARAMS.get(exc.param or "", exc.param)
        raise


def success(text: str) -> PlainTextResponse:
    """vLLM's own answer: 200 and a bare sentence (vLLM sends it without a content type; we say
    text/plain, as the OpenAPI schema documents)."""
    return PlainTextResponse(text, status_code=200)


@router.post(LOAD_PATH, summary="vLLM's load_lora_adapter: register and activate an adapter (admin key)",
             responses=TEXT_200)
async def load_lora_adapter(body: LoadLoRAAdapterRequest, state: State) -> PlainTextResponse:
    name = body.lora_name
    if body.is_3d_lora_weight:
        raise BadRequestError("3D LoRA weights are not supported", param="is_3d_lora_weight")
    if name == state.base.name:
        raise BadRequestError(f"The lora adapter {name!r} conflicts with a served base model.", param="lora_name")
    entry = state.adapters.snapshot.entries.get(name)
    if entry is not None and entry.active_version is not None and not body.load_inplace:
        raise BadRequestError(f"The lora adapter {name!r} has already been loaded. If you want to load the adapter "
                              "in place, set 'load_inplace' to True.", param="lora_name")
    with vllm_fields():
        await register_version(state, RegisterRequest(name=name, path=body.lora_path))
    return success(f"Success: LoRA adapter '{name}' added successfully.")


@router.post(UNLOAD_PATH, summary="vLLM's unload_lora_adapter: retire an adapter, history kept (admin key)",
             responses=TEXT_200)
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, state: State) -> PlainTextResponse:
    name = body.lora_name
    entry = state.adapters.snapshot.entries.get(name)
    if entry is None or entry.removed:
        raise AdapterNotFoundError(f"The lora adapter {name!r} cannot be found.", param="lora_name")
    with vllm_fields():
        await retire(state, name)
    return success(f"Success: LoRA adapter '{name}' removed successfully.")

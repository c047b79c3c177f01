"""The serving replica on Modal: the `Server` class, one GPU container per replica, and its options.

Why these options: a replica takes `max_inputs` requests at once (`@modal.concurrent`), all decoded in
one vLLM continuous batch; Modal's autoscaler adds replicas beyond that (`target_inputs`, up to
`max_containers`, `min_containers` and `buffer_containers` kept warm, idle ones stopped after
`scaledown_window`), and every replica mounts the same volumes, so they serve the same registry. A GPU
string with a count (`H100:2`) gives one replica several GPUs, and vLLM shards the model over them
(tensor parallelism, `LORAMUX_TENSOR_PARALLEL_SIZE` from `config.container_env`). The function's
`timeout` bounds one request, streams and redirected answers included (`config.MODAL_WEB_RESPONSE_CUTOFF_S`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import modal

from deploy.modal_app import resources
from deploy.modal_app.config import CONFIG, ModalConfig, container_env
from deploy.modal_app.images import serving_image
from deploy.modal_app.serving import ServingContainer

if TYPE_CHECKING:
    from fastapi import FastAPI

app = modal.App(f"{CONFIG.app_name}-server")


def server_options(config: ModalConfig, environ: Mapping[str, str]) -> dict[str, Any]:
    """`app.cls` options of the serving replica. HF_TOKEN is here because its first start downloads the model."""
    return {
        "image": serving_image,
        "gpu": config.gpu,
        "volumes": resources.VOLUMES,
        "secrets": [resources.api_keys_secret, resources.hf_secret],
        "env": container_env(config, environ, config.gpu),
        "min_containers": config.min_containers,
        "max_containers": config.max_containers,
        "buffer_containers": config.buffer_containers,
        "scaledown_window": config.scaledown_window,
        "startup_timeout": config.startup_timeout,
        "timeout": config.request_timeout,
    }


def concurrency(config: ModalConfig) -> dict[str, int | None]:
    """`@modal.concurrent`: the replica's hard limit and the autoscaler's target (default: the limit)."""
    return {"max_inputs": config.max_inputs, "target_inputs": config.target_inputs}


@app.cls(**server_options(CONFIG, os.environ))
@modal.concurrent(**concurrency(CONFIG))
class Server:
    """One replica: the vLLM engine, the registry's adapters, the HTTP API (`serving.ServingContainer`)."""

    container: ServingContainer

    @modal.enter()
    async def start(self) -> None:
        """Once per container, on the event loop that then serves the requests (the engine's tasks live there)."""
        self.container = await ServingContainer.start()

    @modal.exit()
    async def stop(self) -> None:
        await self.container.stop()

    @modal.asgi_app()  # no Modal proxy auth: the service's bearer keys guard every route but /health, /ready
    def web(self) -> FastAPI:
        return self.container.app()

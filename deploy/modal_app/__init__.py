"""loramux on Modal: the GPU vLLM service and the training steps, one App composed from small modules.

    config.py       the deploy-time knobs (`LORAMUX_MODAL_*`) and the containers' environment (no `modal`)
    images.py       the serving image (vLLM) and the training image (vLLM + training extra), one CUDA base
    resources.py    the volumes, the registry's lock and the secrets, by name
    volume_sync.py  commit/reload rules: one registry writer at a time, adapters before the registry
    serving.py      a serving container's life: build the state, serve the app, drain
    server.py       the `Server` class (Modal's shell around serving.py), its GPU, concurrency, scaling
    training.py     the training steps, the functions the `loramux` CLI calls
    smoke.py        the smoke client of a deployed service (follows Modal's 303s)
    commands.py     the composed App (`app.include`) and its `modal run` commands

Commands (see deploy/README.md):

    modal deploy -m deploy.modal_app
    modal run -m deploy.modal_app::train --kind router --dataset datasets/routing --run-name router-v2
    modal run -m deploy.modal_app::smoke
"""

from deploy.modal_app.commands import app, dataset, onboard, register, router, smoke, stacked, train
from deploy.modal_app.commands import evaluate as eval  # noqa: A001 - the command's name, as `loramux eval`
from deploy.modal_app.server import Server
from deploy.modal_app.training import (
    remote_dataset,
    remote_eval,
    remote_onboard,
    remote_register,
    remote_router,
    remote_stacked,
    remote_train,
)

# the commands are importable from the package, as `modal run -m deploy.modal_app::<command>` finds them
__all__ = ["Server", "app", "dataset", "eval", "onboard", "register", "router", "smoke", "stacked", "train",
           "remote_dataset", "remote_eval", "remote_onboard", "remote_register", "remote_router",
           "remote_stacked", "remote_train"]

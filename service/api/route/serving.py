"""`POST /route`: the routing decision alone, with every candidate's probability."""

from __future__ import annotations

from starlette.requests import Request

from service.api.common import check_limits, route_info
from service.api.disconnect import until_done
from service.api.generate.protocol import PromptOrMessages
from service.inference import Deadline, route
from service.multimodal import load_chat_images
from service.state import ServiceState


async def serve_route(state: ServiceState, body: PromptOrMessages, request: Request) -> dict:
    check_limits(state.settings, body.messages, None, ())
    deadline = Deadline.for_request(state)
    ticket = state.ticket()
    try:
        # images decoded once admitted; they and the decision share the request's deadline
        messages = await until_done(request, load_chat_images(body.chat(), state.settings, state.engine.image_sizes),
                                    deadline)
        choice = await until_done(request, route(state, messages), deadline)
        choice.release()  # the decision alone: nothing is generated with the adapter
    finally:
        ticket.release()
    info = route_info(choice)
    assert info is not None
    return info

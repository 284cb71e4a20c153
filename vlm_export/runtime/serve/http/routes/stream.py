"""The live view of a source: an MJPEG stream (``multipart/x-mixed-replace``) and a snapshot.

Each part is the source's newest annotated frame, drawn as ``vlm-edge run --save-annotated`` draws
it (with the fate overlay when ``fate=true``). Frames are waited for in worker threads of a
limiter of their own, so viewers never starve the API's threads.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.exceptions import HTTPException

from vlm_export.runtime.serve.http.routes import service_of
from vlm_export.runtime.serve.http.routes.classify import known_source

router = APIRouter(prefix="/v1/sources", tags=["stream"])

BOUNDARY = "frame"
#: how long one wait for a new frame lasts (a worker thread is held at most this long)
WAIT_S = 1.0
#: the pause after a wait that brought no new frame
IDLE_S = 0.1
#: how long the snapshot waits for a first frame
SNAPSHOT_WAIT_S = 5.0
NO_STORE = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
FATE = Query(description="draw the token-fate overlay (which patches the engine kept or merged)")


async def next_frame(request: Request, name: str, after: int, timeout_s: float, fate: bool):
    """``(seq, jpeg)`` newer than ``after``, or None after ``timeout_s``; off the event loop."""
    service = service_of(request)
    limiter: anyio.CapacityLimiter = request.app.state.stream_limiter
    return await anyio.to_thread.run_sync(
        lambda: service.frame(name, after, timeout_s, fate), limiter=limiter
    )


@router.get(
    "/{name}/stream.mjpg",
    summary="Live MJPEG stream of a source's annotated frames",
    response_class=StreamingResponse,
    responses={200: {"content": {f"multipart/x-mixed-replace; boundary={BOUNDARY}": {}}}},
)
async def stream(
    request: Request, name: str, fate: Annotated[bool, FATE] = False
) -> StreamingResponse:
    """One JPEG part per new frame, for as long as the client stays."""
    known_source(request, name)

    async def parts() -> AsyncIterator[bytes]:
        seq = -1
        # ends when the client leaves (Starlette cancels it or the send fails), or within a
        # wait once the server shuts down (which waits for every response to end)
        while not request.app.state.closing:
            got = await next_frame(request, name, seq, WAIT_S, fate)
            if got is None or got[0] <= seq:  # nothing new (or the service stopping): no spin
                await anyio.sleep(IDLE_S)
                continue
            seq, jpeg = got
            head = f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n"
            yield f"{head}X-Frame-Seq: {seq}\r\n\r\n".encode("ascii") + jpeg + b"\r\n"

    return StreamingResponse(
        parts(), media_type=f"multipart/x-mixed-replace; boundary={BOUNDARY}", headers=NO_STORE
    )


@router.get(
    "/{name}/frame.jpg",
    summary="The newest annotated frame of a source",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}, 503: {"description": "no frame yet"}},
)
async def snapshot(
    request: Request,
    name: str,
    fate: Annotated[bool, FATE] = False,
    after: Annotated[
        int, Query(ge=-1, le=2**62, description="wait for a frame newer than this seq")
    ] = -1,
) -> Response:
    """The newest frame as one JPEG, newer than ``after`` (waits up to 5 s). Which frame it is
    and what was decided for it: ``X-Frame-Seq``, ``X-Frame-Class`` (percent-encoded),
    ``X-Frame-Score``, ``X-Frame-Time`` (the page shows the decision of the frame on screen)."""
    known_source(request, name)
    service = service_of(request)
    limiter: anyio.CapacityLimiter = request.app.state.stream_limiter
    got = await anyio.to_thread.run_sync(
        lambda: service.live_frame(name, after, SNAPSHOT_WAIT_S, fate), limiter=limiter
    )
    if got is None:
        raise HTTPException(503, f"no new frame from this source within {SNAPSHOT_WAIT_S:g} s")
    return Response(got.jpeg, media_type="image/jpeg", headers={**NO_STORE, **got.headers()})

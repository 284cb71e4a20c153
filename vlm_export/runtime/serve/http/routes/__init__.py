"""One APIRouter per concern. Routes reach their collaborators through ``request.app.state``
(set by :func:`~vlm_export.runtime.serve.http.app.create_app`), never through module globals."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import Request

if TYPE_CHECKING:
    from vlm_export.runtime.serve.config import ServeSettings
    from vlm_export.runtime.serve.service import Service


def service_of(request: Request) -> Service:
    """The Service this app fronts."""
    return request.app.state.service


def settings_of(request: Request) -> ServeSettings:
    """The settings this app was built with."""
    return request.app.state.settings

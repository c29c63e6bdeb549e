"""Bearer API keys on the JSON API (``/api/…``); keys are made with ``billing api-key create``.

- No ``Authorization: Bearer <key>`` header, a malformed one, or a key that is wrong or revoked:
  401 ``unauthorized`` with ``WWW-Authenticate: Bearer`` (RFC 6750 section 3).
- A ``read`` key on anything but GET/HEAD/OPTIONS: 403 ``forbidden``.

The key is checked by :class:`KeyCheckedRoute` before FastAPI reads the request body, so a caller
without a valid key gets 401 whatever it sends (malformed JSON included) and its body is never parsed.
:func:`api_key` is the same check as a ``Security`` dependency: it makes OpenAPI declare the bearer
scheme on every operation (https://fastapi.tiangolo.com/reference/security/#fastapi.security.HTTPBearer)
and hands the checked key to any handler that asks for it.

The errors are starlette ``HTTPException``s, shaped by the app's one error handler
(:func:`billing.web.app._http_error`).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Request, Response, Security
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from billing import apikeys

_bearer = HTTPBearer(auto_error=False, scheme_name="ApiKey", bearerFormat="bk_<random>",
                     description="A key from `billing api-key create NAME [--scope read|write]`, sent as "
                                 "`Authorization: Bearer <key>`. A `read` key may only GET.")


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(401, message, headers={"WWW-Authenticate": "Bearer"})


async def authenticate(request: Request) -> apikeys.ApiKeyInfo:
    """The request's live key, allowed to do what the request asks; else 401 or 403."""
    # HTTPBearer answers None for a missing header, another scheme, or "Bearer" without a key.
    credentials = await _bearer(request)
    if credentials is None:
        raise _unauthorized("an API key is required: send Authorization: Bearer <key>")
    # The database, on every request: a revoked key stops working at once, in every process.
    key = await run_in_threadpool(apikeys.verify, credentials.credentials)
    if key is None:
        raise _unauthorized("the API key is wrong or has been revoked")
    if not key.allows(request.method):
        raise HTTPException(403, "this API key has scope read: it may only read; this request needs a write key")
    return key


class KeyCheckedRoute(APIRoute):
    """An API route that checks the key first, before the body is read (FastAPI's documented way to run
    code around a route: https://fastapi.tiangolo.com/how-to/custom-request-and-route/)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            request.state.api_key = await authenticate(request)
            return await handler(request)

        return checked


async def api_key(request: Request,
                  _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)]
                  ) -> apikeys.ApiKeyInfo:
    """The checked key of this request (checked here if the route did not do it already)."""
    key = getattr(request.state, "api_key", None)
    return key if key is not None else await authenticate(request)

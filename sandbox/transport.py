"""uvicorn's httptools protocol, exposing the connection's transport to the app.

The fault injector needs to close a connection without any HTTP response (``reset`` and
``lose_response``), which ASGI cannot express: the transport is put in the scope under
``sandbox.transport`` so the app can ``abort()`` it.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class SandboxHttpProtocol(HttpToolsProtocol):
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["sandbox.transport"] = self.transport  # type: ignore[typeddict-unknown-key]

"""The API's routers, one per noun, and the streamed answer they share."""

from collections.abc import AsyncIterator, Callable, Mapping

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class ReleasingStream(StreamingResponse):
    """A streamed answer that calls ``release`` however it ends (done, failed, client gone)."""

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        release: Callable[[], None],
        media_type: str,
        headers: Mapping[str, str],
    ) -> None:
        super().__init__(chunks, 200, headers, media_type)
        self.release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()

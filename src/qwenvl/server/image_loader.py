"""The server's images: read and decoded in thread pools of their own, a request's all at once.

Fetching waits on other machines, so it gets a pool of its own: requests whose fetches hang (up
to the policy's timeout) hold only fetch threads, never the threads that decode pictures sent
inline or build prompts (asyncio's default pool). Decoding is CPU work and holds a decoded
picture in memory, so its pool is as wide as the machine's cores (at most 4) and bounds how many
pictures are being decoded at once, whatever the number of requests.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from ..host_memory import return_free_memory
from ..images import ImageError, ImagePolicy, decode_image, is_remote, read_image
from .errors import APIError

logger = logging.getLogger(__name__)

DEFAULT_FETCH_THREADS = 16


class ImageLoader:
    """Loads the images of requests under `policy`."""

    def __init__(self, policy: ImagePolicy, fetch_threads: int = DEFAULT_FETCH_THREADS):
        self.policy = policy
        self._fetching = ThreadPoolExecutor(fetch_threads, thread_name_prefix="qwenvl-fetch")
        decode_threads = min(4, os.cpu_count() or 1)
        self._decoding = ThreadPoolExecutor(decode_threads, thread_name_prefix="qwenvl-decode")

    async def load_all(self, references: Sequence[tuple[str, str]]) -> list[Image.Image]:
        """The images of `references`, (param, reference) pairs, loaded concurrently; an APIError
        names the first (in order) that fails."""
        results = await asyncio.gather(*(self._load(ref) for _, ref in references), return_exceptions=True)
        if references:
            await asyncio.get_running_loop().run_in_executor(self._decoding, return_free_memory)
        for (param, _), result in zip(references, results, strict=True):
            if isinstance(result, ImageError):
                logger.warning("%s: %s", param, result)
                raise APIError(400, f"{param}: {result.public_message}", param=param, code="invalid_image")
            if isinstance(result, BaseException):
                raise result
        return list(results)

    async def _load(self, reference: str) -> Image.Image:
        loop = asyncio.get_running_loop()
        reading = self._fetching if is_remote(reference) else self._decoding
        data = await loop.run_in_executor(reading, read_image, reference, self.policy)
        return await loop.run_in_executor(self._decoding, decode_image, data, reference, self.policy)

    def close(self) -> None:
        """Stop taking work; threads still fetching end at their timeout."""
        self._fetching.shutdown(wait=False, cancel_futures=True)
        self._decoding.shutdown(wait=False, cancel_futures=True)

"""`jaxdpo annotate DIR`: label the pairs a run waits for in the browser, on a page served from
127.0.0.1 by the standard library alone.

- `queue`: the labeling state, read from the run's request and answer files on every call under a
  lock (`jaxdpo.oracles.human` is the format); left/right placement drawn from the pair id.
- `server`: the page (`page.html`) and its JSON API.
"""

from jaxdpo.annotate.queue import Conflict, LabelQueue, left_response
from jaxdpo.annotate.server import DEFAULT_PORT, make_server, serve

__all__ = ["DEFAULT_PORT", "Conflict", "LabelQueue", "left_response", "make_server", "serve"]

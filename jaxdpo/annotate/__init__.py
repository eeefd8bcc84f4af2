"""`jaxdpo annotate DIR`: label the pairs a run waits for in the browser, on a page served from
127.0.0.1 by the standard library alone.

- `queue`: the labeling state, read from the run's request and answer files on every call under a
  lock (`jaxdpo.oracles.human` is the format); left/right placement drawn from the pair id.
- `server`: the page (`page.html`) and its JSON API.

The names are imported on first use (`jaxdpo.lazy`): the command line's parser reads DEFAULT_PORT.
"""

from typing import TYPE_CHECKING

from jaxdpo.lazy import lazy_exports

DEFAULT_PORT = 8765

_EXPORTS = {"jaxdpo.annotate.queue": ("Conflict", "LabelQueue", "left_response"), "jaxdpo.annotate.server": ("make_server", "serve")}
__all__ = ["DEFAULT_PORT", *sorted(name for names in _EXPORTS.values() for name in names)]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:
    from jaxdpo.annotate.queue import Conflict, LabelQueue, left_response
    from jaxdpo.annotate.server import make_server, serve

"""dualcast: one Redis Stream fanned out to WebSocket, SSE and long-polling subscribers."""

import os as _os

__version__ = "0.1.0"

# A browser's WebSocket upgrade carries its token in the request line (it cannot set
# headers), and a token may be 8,192 characters (`auth.Authenticator.MAX_TOKEN`):
# websockets' default of 8 KiB per line answered such upgrades 414, so the longest
# tokens could never use WebSocket. websockets reads this when first imported; an
# operator's own value wins. (The whole request head stays bounded at 64 KiB.)
_os.environ.setdefault("WEBSOCKETS_MAX_LINE_LENGTH", "16384")

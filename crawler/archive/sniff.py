"""What a media file really is, told by its first bytes, never by its URL.

The CDN names every image `.jpeg` and every video `.mp4` whatever it holds (PNG,
WebP, GIF, AVIF, WebM ...), and a challenge page can come with status 200: the
bytes decide. `filetype` reads the magic numbers; this module only says which
kinds the archive keeps.
"""

from __future__ import annotations

from dataclasses import dataclass

import filetype

HEAD_BYTES = 512  # enough for every matcher used here (filetype reads at most 261)
KINDS = ("image", "video", "audio")


@dataclass(frozen=True, slots=True)
class Format:
    ext: str  # the file's extension: "png", "webm", ...
    content_type: str  # "image/png"
    kind: str  # "image", "video" or "audio"


_EXT = {"jpg": "jpeg"}  # the name the CDN itself uses


def sniff(head: bytes) -> Format | None:
    """The format of a file starting with `head`; None when it is no image, video or sound."""
    guess = filetype.guess(head)
    if guess is None:
        return None
    kind = guess.mime.split("/", 1)[0]
    if kind not in KINDS:
        return None
    return Format(_EXT.get(guess.extension, guess.extension), guess.mime, kind)

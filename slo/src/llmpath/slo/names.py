"""File names derived from spec values (alert names, SLO IDs), kept within what file systems accept."""

from __future__ import annotations

import hashlib

#: Longest generated file name, in bytes. File systems allow 255; writers add a temporary prefix and suffix
#: (``.<name>.<random>.tmp``), so names stay well below that.
MAX_FILE_NAME_BYTES = 200


def bounded_file_name(stem: str, suffix: str, limit: int = MAX_FILE_NAME_BYTES) -> str:
    """``stem + suffix``, or, when that is longer than ``limit`` bytes, the stem cut short and followed by
    ``~<10 hex digits of its SHA-256>`` so that different long stems still get different names."""
    name = stem + suffix
    if len(name.encode()) <= limit:
        return name
    digest = hashlib.sha256(stem.encode()).hexdigest()[:10]
    room = limit - len(suffix.encode()) - len(digest) - 1
    cut = stem.encode()[:room].decode(errors="ignore")
    return f"{cut}~{digest}{suffix}"

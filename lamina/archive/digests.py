"""The CRC-32s an apply takes of the files it writes, handed to the layer's manifest.

``Digests`` maps an inode to ``(size, mtime_ns, crc)``, both as ``fstat`` gave them
once the file was complete.  The manifest's walk uses one only while the file still
has that size and mtime (the applier forgets an inode it reuses for anything but data
from the stream) and reads every other file, so a stale entry can cost a read but
never a wrong digest.
"""

from __future__ import annotations

Digests = dict[int, tuple[int, int, int]]
"""inode -> (size, mtime_ns, CRC-32 of the data)."""

MAX_DIGESTS = 1 << 18
"""Files whose digest one apply keeps (some 60 MB); beyond them files are read again."""

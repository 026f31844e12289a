"""Producer side of the ingest protocol (PROTOCOL.md section 1): the public names, in one place.

Owns nothing but this list. The code lives by job in:
  pairlane.columns       validation and preparation of result columns
  pairlane.chunks        chunk planning and the one chunk encoder
  pairlane.loaders       result files (JSON, msgpack, CSV)
  pairlane.synthetic     synthetic results for tests and benchmarks
  pairlane.conversation  the I/O-free producer conversation (begin, credits, end, resume)
  pairlane.producer      the DEALER socket Producer that drives it, and SendError

Never does anything of its own: `from pairlane.client import Producer` and
the names below keep working for the code and the users that import them.
"""
from __future__ import annotations

from .chunks import MAX_CHUNK_ROWS, encode_chunk, plan_chunks
from .columns import prepare_columns
from .loaders import load_file
from .producer import Producer, SendError, log
from .synthetic import result_columns as synthetic_columns

__all__ = [
    "MAX_CHUNK_ROWS", "Producer", "SendError", "encode_chunk", "load_file", "log", "plan_chunks",
    "prepare_columns", "synthetic_columns",
]

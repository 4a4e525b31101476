"""Interned frames: re-exported from ``otlp_middleware._frames`` (the lowest layer)."""

from .._frames import FRAMES as FRAMES
from .._frames import TRUNCATED_NAME as TRUNCATED_NAME
from .._frames import FrameInfo as FrameInfo
from .._frames import FrameTable as FrameTable
from .._frames import capture_stack as capture_stack
from .._frames import truncate as truncate
from .._frames import truncated_marker as truncated_marker

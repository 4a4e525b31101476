"""pprof output: build ``perftools.profiles.Profile`` messages and read/write them.

from otlp_middleware.pprof import cpu_profile, write_profile
"""

from ._builder import CPU_SAMPLE_TYPES as CPU_SAMPLE_TYPES
from ._builder import HEAP_SAMPLE_TYPES as HEAP_SAMPLE_TYPES
from ._builder import PprofBuilder as PprofBuilder
from ._builder import cpu_profile as cpu_profile
from ._builder import heap_profile as heap_profile
from ._io import parse as parse
from ._io import read_profile as read_profile
from ._io import serialize as serialize
from ._io import write_profile as write_profile
from ._records import merged_profiles as merged_profiles
from ._records import record_profiles as record_profiles
from ._window import PprofWindow as PprofWindow
from .profile_pb2 import Profile as Profile

__all__ = [
    "CPU_SAMPLE_TYPES",
    "HEAP_SAMPLE_TYPES",
    "PprofBuilder",
    "PprofWindow",
    "Profile",
    "cpu_profile",
    "heap_profile",
    "merged_profiles",
    "parse",
    "read_profile",
    "record_profiles",
    "serialize",
    "write_profile",
]

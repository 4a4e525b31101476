"""OTLP profiles: typed attributes, the explicit ``ProfileBuilder`` and batch encoding.

``encode_profiles`` turns ``ProfileRecord`` and ``BuiltProfile`` objects into one
``ExportProfilesServiceRequest`` of the OTLP v1.10.0 layout (opentelemetry-proto 1.45.x);
the HTTP exporter in ``otlp_middleware.export`` sends it.
"""

from ._attributes import AttributeValue as AttributeValue
from ._builder import BuiltProfile as BuiltProfile
from ._builder import ProfileBuilder as ProfileBuilder
from ._builder import generate_profile_id as generate_profile_id
from ._encode import DEFAULT_SAMPLE_ATTRIBUTE_KEYS as DEFAULT_SAMPLE_ATTRIBUTE_KEYS
from ._encode import Exportable as Exportable
from ._encode import RecordWindow as RecordWindow
from ._encode import count_profiles as count_profiles
from ._encode import encode_profiles as encode_profiles
from ._resource import ResourceConfig as ResourceConfig

__all__ = [
    "DEFAULT_SAMPLE_ATTRIBUTE_KEYS",
    "AttributeValue",
    "BuiltProfile",
    "Exportable",
    "ProfileBuilder",
    "RecordWindow",
    "ResourceConfig",
    "count_profiles",
    "encode_profiles",
    "generate_profile_id",
]

"""Build a ``RequestProfiler`` from keyword options and the configuration sources.

Adapters call ``build_request_profiler(**options)``: ``otlp_middleware.config.Settings``
merges the options with framework settings, the settings module and the environment; objects
that are not plain settings (an ``exporter``, a ``CpuProfilerConfig`` for ``cpu``, a
``MemoryProfilerConfig`` for ``memory``) are taken as given.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..config import Settings
from ..export._base import Exporter
from ..export._batch import BatchProcessor
from ..profiling.cpu import CpuProfilerConfig
from ._core import RequestProfiler


def default_exporter(settings: Settings) -> Exporter:
    """OTLP/HTTP when an endpoint is configured, else pprof files in ``output_dir``."""
    if settings.endpoint:
        from ..export._otlp_http import exporter_from_settings

        return exporter_from_settings(settings)
    from ..export._file import FileExporter

    return FileExporter(settings.output_dir, aggregate=settings.aggregate)


def build_request_profiler(
    *,
    framework_settings: Mapping[str, Any] | None = None,
    exporter: Exporter | None = None,
    cpu: bool | CpuProfilerConfig | None = None,
    memory: Any = None,
    **options: Any,
) -> RequestProfiler:
    """Resolve every setting and assemble the request profiler with its export queue."""
    cpu_config = cpu if isinstance(cpu, CpuProfilerConfig) else None
    memory_config = memory if memory is not None and not isinstance(memory, bool) else None
    if cpu_config is None and cpu is not None:
        options["cpu"] = cpu
    if memory_config is None and memory is not None:
        options["memory"] = memory
    settings = Settings.load(framework_settings=framework_settings, **options)
    if cpu_config is None and settings.cpu:
        cpu_config = CpuProfilerConfig(
            sampling_frequency=settings.cpu_frequency,
            include_system_calls=settings.include_system_calls,
            max_stack_depth=settings.max_stack_depth,
        )
    if memory_config is None and settings.memory:
        from ..profiling.memory import MemoryProfilerConfig

        memory_config = MemoryProfilerConfig(sampling_rate=settings.memory_sampling_rate)
    processor = BatchProcessor(
        exporter if exporter is not None else default_exporter(settings),
        max_queue_size=settings.max_queue_size,
        max_export_batch_size=settings.max_export_batch_size,
        schedule_delay=settings.schedule_delay,
        export_timeout=settings.export_timeout,
    )
    return RequestProfiler(
        sampler=settings.build_sampler(),
        processor=processor,
        cpu=cpu_config if settings.cpu or isinstance(cpu, CpuProfilerConfig) else None,
        memory=memory_config,
        exclude_paths=settings.exclude_paths,
        enabled=settings.enabled,
    )

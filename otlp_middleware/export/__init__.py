"""Where profiles go: the batching queue, pprof files, and OTLP over HTTP."""

from ._base import Exporter as Exporter
from ._base import ExportResult as ExportResult
from ._batch import BatchProcessor as BatchProcessor
from ._batch import BatchStats as BatchStats
from ._file import FileExporter as FileExporter

__all__ = ["BatchProcessor", "BatchStats", "ExportResult", "Exporter", "FileExporter"]

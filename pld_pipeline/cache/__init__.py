"""The teacher-logit cache: a Zarr v3 group keyed by (sample key, view). See docs/cache-format.md."""
from . import codecs as _codecs
from .cache import Cache, ShardBlock, TeacherBlock
from .check import VerifyReport, inspect_cache, verify_cache
from .format import CacheError, CacheMeta, SampleStatus, ShardRecord, TeacherRecord, UnitName, teacher_id_from_name

__all__ = [
    "Cache", "CacheError", "CacheMeta", "SampleStatus", "ShardBlock", "ShardRecord", "TeacherBlock",
    "TeacherRecord", "UnitName", "VerifyReport", "inspect_cache", "teacher_id_from_name", "verify_cache",
]

_codecs.install()  # zstd chunks decode into buffers of their chunk's size (codecs.BoundedZstd)

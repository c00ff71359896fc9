"""The teacher-logit cache: a Zarr v3 group keyed by (sample key, view). See docs/cache-format.md."""
from .check import VerifyReport, inspect_cache, verify_cache
from .format import CacheError, CacheMeta, SampleStatus, ShardRecord, TeacherRecord, teacher_id_from_name
from .reader import CacheReader, ShardBlock
from .writer import CacheWriter, TeacherBlock

__all__ = [
    "CacheError", "CacheMeta", "CacheReader", "CacheWriter", "SampleStatus", "ShardBlock", "ShardRecord",
    "TeacherBlock", "TeacherRecord", "VerifyReport", "inspect_cache", "teacher_id_from_name", "verify_cache",
]

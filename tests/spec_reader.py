"""A reader of pld caches written from docs/cache-format.md alone: zarr, numpy and the standard library, no
import of pld_pipeline, no directory listing (objects are opened by path only, as on a static HTTP host).

It is what a team that does not use this package would write, and the tests hold it against real caches
(tests/test_spec_reader.py): every unit it accepts must read exactly what pld_pipeline reads, and every unit
pld_pipeline refuses it must refuse too.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
import urllib.error
import urllib.request

import numpy as np
import zarr

UNBOUND_DEFAULTS = {"precision": "fp32", "pretrained": None}  # "Binding": left out while at these values
TEACHER_ARRAYS = ("topk_idx", "top1_logp", "topk_dlogp", "label_logp", "logz")
DATA_ARRAYS = ("samples/key", "samples/label", "samples/status", "samples/digest", "views/params")  # "Cache digest"


class Refused(Exception):
    pass


def canonical_sha256(doc) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def region_sha256(arr: np.ndarray) -> str:
    arr = np.ascontiguousarray(arr)
    return hashlib.sha256(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()).hexdigest()


class SpecReader:
    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.root = zarr.open_group(url, mode="r")
        self.meta = self.root.attrs["pld_cache"]
        if self.meta["format"] != "pld-cache" or self.meta["version"] not in (2, 3):
            raise Refused(f"not a pld cache v2/v3: {self.meta.get('format')} v{self.meta.get('version')}")
        if (self.meta["version"] == 3) != ("mix" in self.meta["views"]["recipe"]):
            raise Refused("version and recipe disagree on mixed views")
        self.S = self.meta["rows_per_shard"]

    # -- "Completion markers": the unit index, then each marker by path ----------------------------------------
    def units(self, shard: int) -> list[str]:
        return list(zarr.open_group(self.root.store, path=f"unit_index/s{shard:06d}", mode="r").attrs["units"])

    def marker(self, name: str) -> dict:
        return dict(zarr.open_group(self.root.store, path=f"units/{name}", mode="r").attrs)

    def binding(self, name: str, shard: int, teacher: str | None) -> str:
        m = self.meta
        doc = {"unit": name, "format": m["format"], "version": m["version"], "num_classes": m["num_classes"],
               "class_names": m["class_names"], "rows_per_shard": m["rows_per_shard"], "key_bytes": m["key_bytes"],
               "recipe": m["views"]["recipe"], "seed": m["views"]["seed"],
               "shard": {k: v for k, v in m["shards"][shard].items() if k != "url"}}
        if teacher is not None:
            doc["teacher"] = {k: v for k, v in m["teachers"][teacher].items()
                              if k not in UNBOUND_DEFAULTS or v != UNBOUND_DEFAULTS[k]}
        return canonical_sha256(doc)

    def read_unit(self, name: str) -> dict[str, np.ndarray]:
        """The unit's arrays over its region, after the checks of "Reading a unit safely"."""
        parts = name.split(".")
        shard = int(parts[0][1:])
        rows = slice(shard * self.S, (shard + 1) * self.S)
        if parts[1] == "samples":
            paths, region, teacher = ["samples/key", "samples/label", "samples/status", "samples/digest"], (rows,), None
        else:
            a, b = (int(x) for x in parts[-1].split("-"))
            teacher = parts[2] if parts[1] == "teacher" else None
            paths = ["views/params"] if teacher is None else [f"teachers/{teacher}/{n}" for n in TEACHER_ARRAYS]
            region = (rows, slice(a, b))
        rec = self.marker(name)
        if rec["binding"] != self.binding(name, shard, teacher):
            raise Refused(f"{name}: binding")
        if sorted(rec["checksums"]) != sorted(paths):
            raise Refused(f"{name}: arrays {sorted(rec['checksums'])}")
        out = {}
        for path in paths:
            try:
                arr = np.asarray(self.root[path][region])
            except Exception as e:  # noqa: BLE001 - crc32c or a broken object
                raise Refused(f"{name}: {path} unreadable ({type(e).__name__})") from None
            if region_sha256(arr) != rec["checksums"][path]:
                raise Refused(f"{name}: {path} checksum")
            out[path] = arr
        return out

    # -- one shard: "Reading one shard", assembled from checked units -------------------------------------------
    def shard(self, shard: int, teacher: str, tau: float = 1.0) -> dict[str, np.ndarray | list]:
        n, V = self.meta["shards"][shard]["nsamples"], self.meta["views"]["num_views"]
        names = self.units(shard)
        samples = self.read_unit(f"s{shard:06d}.samples")
        out = {"keys": [bytes(k).rstrip(b"\0").decode("utf-8") for k in samples["samples/key"][:n]],
               "labels": samples["samples/label"][:n], "status": samples["samples/status"][:n],
               "digests": samples["samples/digest"][:n]}
        col = self.meta["teachers"][teacher]["temperatures"].index(tau)
        got: dict[str, np.ndarray] = {}
        covered = {"views": set(), "teacher": set()}
        for name in names:
            parts = name.split(".")
            kind = parts[1]
            if kind == "samples" or (kind == "teacher" and parts[2] != teacher):
                continue
            a, b = (int(x) for x in parts[-1].split("-"))
            for path, arr in self.read_unit(name).items():
                got.setdefault(path, np.empty((n, V) + arr.shape[2:], arr.dtype))[:, a:b] = arr[:n]
            covered[kind] |= set(range(a, b))
        if covered["views"] != set(range(V)) or covered["teacher"] != set(range(V)):
            raise Refused(f"shard {shard} incomplete")
        t = f"teachers/{teacher}/"
        logp = got[t + "top1_logp"].astype(np.float64)[..., None] + got[t + "topk_dlogp"].astype(np.float64)
        logz = got[t + "logz"][..., col].astype(np.float64)
        out.update(params=got["views/params"], topk_idx=got[t + "topk_idx"],
                   topk_p=np.exp(logp / tau - logz[..., None]),
                   label_p=np.exp(got[t + "label_logp"].astype(np.float64) / tau - logz))
        out["tail"] = np.clip(1.0 - out["topk_p"].sum(-1), 0.0, None)
        return out

    # -- "Key index": fence, one chunk of each array, sha256, bisect ----------------------------------------------
    def find(self, key: str) -> int | None:
        group = zarr.open_group(self.root.store, path="key_index", mode="r")
        rec = group.attrs["pld_key_index"]
        m = self.meta
        if rec["binding"] != canonical_sha256({"rows_per_shard": m["rows_per_shard"], "key_bytes": m["key_bytes"],
                                               "shards": [{"sha256": s["sha256"], "nsamples": s["nsamples"]}
                                                          for s in m["shards"]]}):
            raise LookupError("stale key index")
        padded = key.encode("utf-8").ljust(m["key_bytes"], b"\0")
        c = bisect.bisect_right([bytes.fromhex(f) for f in rec["fence"]], padded) - 1
        if c < 0:
            return None
        part = slice(c * rec["chunk_rows"], min((c + 1) * rec["chunk_rows"], rec["count"]))
        keys, rows = np.asarray(self.root["key_index/keys"][part]), np.asarray(self.root["key_index/rows"][part])
        if region_sha256(keys) != rec["checksums"]["keys"][c] or region_sha256(rows) != rec["checksums"]["rows"][c]:
            raise Refused("key index chunk checksum")
        as_bytes = [bytes(k) for k in keys]
        i = bisect.bisect_left(as_bytes, padded)
        return int(rows[i]) if i < len(as_bytes) and as_bytes[i] == padded else None

    # -- "Cache digest": the listed documents, parsed, in one canonical JSON document ----------------------------
    def document(self, key: str):
        """The parsed JSON object at ``key`` (relative to the cache), None where there is none."""
        if self.url.startswith(("http://", "https://")):
            try:
                with urllib.request.urlopen(f"{self.url}/{key}") as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as e:
                if e.code == 404:
                    return None
                raise
        path = os.path.join(self.url, *key.split("/"))
        if not os.path.isfile(path):
            return None
        with open(path, "rb") as f:
            return json.loads(f.read())

    def digest(self) -> str:
        names = sorted({n for s in range(len(self.meta["shards"])) for n in self.units(s)})
        arrays = list(DATA_ARRAYS) + [f"teachers/{t}/{a}" for t in sorted(self.meta["teachers"]) for a in TEACHER_ARRAYS]
        keys = (["zarr.json"] + [f"{a}/zarr.json" for a in arrays]
                + ["key_index/zarr.json", "key_index/keys/zarr.json", "key_index/rows/zarr.json"]
                + [f"units/{n}/zarr.json" for n in names])
        doc = {"definition": "pld-cache-digest/1", "objects": {k: self.document(k) for k in keys}}
        return "sha256:" + canonical_sha256(doc)

"""docs/library.md's training loop against `pld distill` on the same data, cache and budget, 3 seeds each.

    python benchmarks/library_bench.py [--demo-dir pld-demo]

Data, teacher and cache are the demo's (`pld demo`, real handwritten digits; made here when --demo-dir has none),
since the demo's redesign its 200 labelled images (train shard 0, the cached ones; library.json predates that).
Both train cifar_resnet8 with PLD from the cache for 12 epochs, batch 64, AdamW lr 3e-3, weight decay 0.05; the
library loop is the documented one as written (its own OneCycle schedule), `pld distill` uses its cosine
schedule with a warm-up epoch. Validation top-1 after the last epoch, evaluated the same way for both.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics

import torch
from torch.utils.data import DataLoader

from pld_pipeline.data import expand_shards
from pld_pipeline.demo import DemoConfig, run_demo
from pld_pipeline.distill import DistillConfig, distill
from pld_pipeline.student_data import EvalSamples, StudentData
from pld_pipeline.models import student_preprocessing
from pld_pipeline.views import normalize

from _results import write_results

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "library.md")


def library_loop(cache: str, train: str, seed: int, epochs: int) -> torch.nn.Module:
    code = re.search(r"```python\n(.*?)```", open(DOC).read(), re.S).group(1)
    code = code.replace('CACHE, DATA, EPOCHS = "cache.zarr", "shards/train-{000000..000009}.tar", 10',
                        f"CACHE, DATA, EPOCHS = {cache!r}, {train!r}, {epochs}")
    code = code.replace("batch_size=128, workers=2,", f"batch_size=64, workers=1, seed={seed},")
    code = code.replace("torch.manual_seed(0)", f"torch.manual_seed({seed})").replace("cifar_resnet20", "cifar_resnet8")
    scope: dict = {}
    exec(compile(code, DOC, "exec"), scope)
    return scope["model"]


@torch.no_grad()
def top1(model: torch.nn.Module, val: str, cache: str, train: str) -> float:
    data = StudentData(train, cache=cache, batch_size=64, workers=0)
    prep = student_preprocessing(model)
    loader = DataLoader(EvalSamples(expand_shards(val), recipe=data.recipe, rank=0, world=1, num_classes=10), batch_size=256)
    model.eval()
    hits = total = 0
    for batch in loader:
        hits += int((model(normalize(batch["image"], prep["mean"], prep["std"])).argmax(1) == batch["label"]).sum())
        total += len(batch["label"])
    return 100.0 * hits / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo-dir", default="pld-demo")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--out", default="benchmarks/results/library.json")
    args = ap.parse_args()
    cache = os.path.join(args.demo_dir, "cache.zarr")
    if not os.path.isdir(cache):
        run_demo(DemoConfig(out=args.demo_dir, losses=("pld",), seeds=(0,), online=False))
    data_dir = os.path.join(args.demo_dir, "data")
    train = os.path.join(data_dir, "train-000000.tar")  # the demo caches its teacher over the labelled subset only
    val = "::".join(sorted(os.path.join(data_dir, f) for f in os.listdir(data_dir) if f.startswith("val")))
    acc: dict[str, list[float]] = {"library loop (docs/library.md)": [], "pld distill": []}
    for seed in args.seeds:
        model = library_loop(cache, train, seed, args.epochs)
        acc["library loop (docs/library.md)"].append(top1(model, val, cache, train))
        s = distill(DistillConfig(data=train, val_data=val, cache=cache, out=os.path.join(args.demo_dir, f"lib-bench-{seed}"),
                                  student="cifar_resnet8", loss="pld", epochs=args.epochs, batch_size=64, lr=3e-3,
                                  weight_decay=0.05, warmup_epochs=1.0, workers=1, device="cpu", seed=seed))
        acc["pld distill"].append(s["last_val_top1"])
        print({k: v[-1] for k, v in acc.items()}, flush=True)
    for name, xs in acc.items():
        print(f"{name}: {statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}  ({', '.join(f'{x:.2f}' for x in xs)})")
    write_results(args.out, {"args": vars(args), "val_top1": acc})


if __name__ == "__main__":
    main()

"""Items per second of ``daam-fast batch`` on the local and the Ray engine, measured in the same run.

    python benchmarks/batch_throughput.py [--items 24] [--steps 20] [--rounds 2] [--out bench-out]
    python benchmarks/batch_throughput.py --device cuda --model ./sdxl --size 1024x1024 --ray-workers 1,2,4,8

Each round runs the same items (the demo model by default: prompts x seeds, every item a fresh output folder)
with each variant in turn — the local engine (one process, each of ``--local-threads`` torch threads) and the Ray engine
with each of ``--ray-workers`` actors (``--ray-threads`` threads each on the CPU, one GPU each with
``--device cuda``) — and reports per variant the median over rounds of

- steady items/s: items over the time from the engine being ready (model loaded; Ray started, actors loaded)
  to the last item written;
- end-to-end items/s: items over the whole ``run_batch`` call (startup included, the summary not);
- one item's generation: the median of the index's ``seconds`` (the traced pipeline call alone, in its worker).

The Ray engine here starts its own local Ray each time (what ``daam-fast batch --engine ray`` does). The load
average before and after is printed: on a shared machine the numbers measure the neighbours too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from daam_fast.batch import make_engine, read_index, read_prompts, run_batch  # noqa: E402

PROMPTS = (
    "a red circle and a blue square",
    "a yellow triangle and a green circle",
    "a white square and a red triangle and a blue circle",
)


class Timed:
    """An engine whose startup end and last outcome are timestamped."""

    def __init__(self, engine):
        self.engine, self.ready, self.last = engine, None, None

    def start(self):
        self.engine.start()
        self.ready = time.perf_counter()

    def check_words(self, specs, words):
        self.engine.check_words(specs, words)

    def run(self, items):
        for outcome in self.engine.run(items):
            self.last = time.perf_counter()
            yield outcome

    def close(self):
        self.engine.close()


def _one(variant: dict, specs, model: str, device: str, root: Path) -> dict:
    engine = Timed(
        make_engine(variant["engine"], model, device, workers=variant.get("workers"), threads=variant["threads"])
    )
    if variant["engine"] == "local":
        torch.set_num_threads(variant["threads"])
    out = Path(tempfile.mkdtemp(prefix=f"{variant['name']}-", dir=root))
    start = time.perf_counter()
    result = run_batch(specs, out, engine, model=model, progress=False, summary=False)
    if result.failed:
        raise RuntimeError(f"{variant['name']}: {len(result.failed)} item(s) failed: {result.failed[0]['error']}")
    n = result.ok
    seconds = [r["seconds"] for r in read_index(out / "index.jsonl").values()]
    return {
        "steady": n / (engine.last - engine.ready),
        "end_to_end": n / (engine.last - start),
        "items": n,
        "generation_s": statistics.median(seconds),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo")
    p.add_argument("--device", default="cpu")
    p.add_argument("--items", type=int, default=24, help="items per variant and round (prompts x seeds)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", default=None, help="WxH (default: the model's own)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--local-threads", default=f"1,{os.cpu_count()}", help="comma-separated torch thread counts")
    p.add_argument("--ray-workers", default=f"1,{os.cpu_count()}", help="comma-separated actor counts ('': none)")
    p.add_argument("--ray-threads", type=int, default=1)
    p.add_argument("--out", default="bench-out")
    p.add_argument("--work", default=None, help="folder for the batches' outputs (default: a new temp folder)")
    args = p.parse_args(argv)

    from diffusers.utils import logging as dlogging

    from daam_fast.cli import _size

    dlogging.set_verbosity_error()  # loading chatter, once per engine and round
    dlogging.disable_progress_bar()

    work = Path(args.work or tempfile.mkdtemp(prefix="batch-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    seeds = -(-args.items // len(PROMPTS))
    (work / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    specs = read_prompts(
        work / "prompts.txt", seeds=f"0-{seeds - 1}", steps=args.steps, size=_size(args)
    )
    variants = []
    if not args.device.startswith("cuda"):
        for t in (int(x) for x in args.local_threads.split(",")):
            variants.append({"name": f"local-{t}", "engine": "local", "threads": t})
    for w in (int(x) for x in args.ray_workers.split(",") if x.strip()):
        variants.append({"name": f"ray-{w}", "engine": "ray", "workers": w, "threads": args.ray_threads})
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {v["name"]: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            runs[v["name"]].append(_one(v, specs, args.model, args.device, work))
    load_after = os.getloadavg()
    rows = []
    for v in variants:
        r = runs[v["name"]]
        rows.append(
            {
                **v,
                "items": r[0]["items"],
                "steady_items_per_s": statistics.median(x["steady"] for x in r),
                "end_to_end_items_per_s": statistics.median(x["end_to_end"] for x in r),
                "generation_s": statistics.median(x["generation_s"] for x in r),
                "rounds": r,
            }
        )
    table = [
        f"model {args.model}, device {args.device}, {args.steps} steps, {rows[0]['items']} items, "
        f"{args.rounds} rounds (median); load average {load_before[0]:.1f} before, {load_after[0]:.1f} after",
        "",
        "| engine | workers x torch threads | steady items/s | end-to-end items/s (startup included) "
        "| one item's generation (s, median) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['engine']} | {r.get('workers', 1)} x {r['threads']} | {r['steady_items_per_s']:.2f} | "
            f"{r['end_to_end_items_per_s']:.2f} | {r['generation_s']:.3f} |"
        )
    text = "\n".join(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "batch_throughput.md").write_text(text + "\n")
    (out / "batch_throughput.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What predicting items on Ray workers costs, against the same run in one process.

On MiLiC-Eval's Uyghur dialogue translation (read from ``../shared/data/milic-eval``) with the demo
trio, runs the same evaluation (``trimix eval``'s own code, into a fresh run folder each time) as:

* ``local``: the models in this process, ``--threads`` threads;
* ``ray 1x2``: one Ray worker with two threads (a local Ray instance on 127.0.0.1);
* ``ray 2x1``: two Ray workers with one thread each.

and prints items per second for each (model loading and Ray's start excluded: the time of the
task's items, as ``trimix eval`` measures it), and Ray's overhead per item with one worker: the
driver's time per item less the worker's own time per item (the ``seconds`` of its records), as a
share of the worker's time (target: at most 5 % on the demo trio). The three runs must give the
same predictions; the script checks that too.

    python benchmarks/bench_ray.py [--data ../shared/data/milic-eval] [--limit 20] [-n 16]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from trimix_cpp.evaluation.cluster import ClusterOptions, ray_backend
from trimix_cpp.evaluation.folder import PREDICTIONS
from trimix_cpp.evaluation.pipeline import EvalConfig, LocalBackend, QuietReporter, run_evaluation
from trimix_cpp.modelset import ModelSet

HERE = Path(__file__).resolve().parent


def run(label: str, task: str, args: argparse.Namespace, backend, threads: int) -> dict:
    modelset = ModelSet.make("demo", {})
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cfg = EvalConfig(methods=args.methods, out=out, shots=args.shots, limit=args.limit, max_tokens=args.n)
        run_evaluation([task], modelset, modelset.load_options(None, threads), cfg, QuietReporter(), backend)
        recs = [json.loads(x) for x in (out / PREDICTIONS).read_text(encoding="utf-8").splitlines() if x]
    items_s = sum(t["items_s"] for t in cfg.timings.values())
    per_item = {r["id"]: r["seconds"] for r in recs}  # every method of an item shares one time
    worker_s = sum(per_item.values())
    answers = {(r["id"], r["method"]): r["output"] for r in recs}
    n = len(per_item)
    return {"label": label, "items": n, "items_s": items_s, "worker_s": worker_s, "answers": answers}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=HERE.parents[1] / "shared" / "data" / "milic-eval")
    p.add_argument("--limit", type=int, default=20, help="items of the task")
    p.add_argument("-n", type=int, default=16, help="most tokens per answer")
    p.add_argument("--shots", type=int, default=2)
    p.add_argument("--methods", default="large-ins,trimix-ppl")
    args = p.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"no MiLiC-Eval data at {args.data} (give --data)")
    task = f"milic:{args.data}:translation_dialogue:ug"
    rows = [
        run("local, 2 threads", task, args, LocalBackend, 2),
        run("ray 1 worker x 2 threads", task, args, ray_backend(ClusterOptions(None, 1, 2)), 2),
        run("ray 2 workers x 1 thread", task, args, ray_backend(ClusterOptions(None, 2, 1)), 1),
    ]
    same = all(r["answers"] == rows[0]["answers"] for r in rows)
    print(f"\n{rows[0]['items']} items of translation_dialogue:ug, methods {args.methods}, -n {args.n}")
    print("| run | items/s | driver s/item | worker s/item |")
    print("|---|---|---|---|")
    for r in rows:
        n = r["items"]
        print(f"| {r['label']} | {n / r['items_s']:.3f} | {r['items_s'] / n:.3f} | {r['worker_s'] / n:.3f} |")
    one = rows[1]
    overhead = (one["items_s"] - one["worker_s"]) / one["items"]
    share = overhead / (one["worker_s"] / one["items"]) * 100
    print(f"\nRay's overhead per item (1 worker): {overhead * 1000:.1f} ms, {share:.1f} % of a worker's item")
    print("(target: at most 5 %)")
    print(f"same predictions in all three runs: {'yes' if same else 'NO'}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()

"""Two tenants saturating one engine: how the batch's tokens are shared between them.

Tenant "long" asks 96 tokens per request, tenant "short" 12, each from 16 closed-loop clients
(threads submitting to one Engine in this process, the server's default flags otherwise), on
a random Llama (hidden 256 x 4 layers, no adapter). After a 5 s warm-up, a 30 s window:
the tokens each tenant got, the short tenant's share, and each tenant's time to first token.
Requests counted as turns give the long tenant most of the batch (its rows stay 8 times
longer); tokens counted as service give each about half.

Run: `.venv/bin/python scripts/tenant_share.py [--root CHECKOUT]`; `--root` points at another
checkout of loramux (for example a `git worktree` of an older commit) to measure its
scheduler the same way.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
    parser.add_argument("--window-s", type=float, default=30.0)
    parser.add_argument("--join-max-steps", type=int, default=None, help="default: the server's")
    args = parser.parse_args()
    sys.path[:0] = [f"{args.root}/service", f"{args.root}/client"]
    from loramux.bench.assets import ModelShape, text_workload
    from loramux.server.engine.engine import Engine
    from loramux.server.engine.inputs import GenerateInput
    from loramux.server.engine.request import ErrorEvent, FinishEvent, TokenEvent
    from loramux.server.model.base_model import load_base_model
    from loramux.server.settings import Settings

    jobs = {"long": 96, "short": 12}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tokenizer, prompts, _ = text_workload(work, 32, probes=0)
        base = ModelShape("h256-l4", 256, 4, 768, heads=4, max_positions=1024).build(work / "model", tokenizer)
        joins = {} if args.join_max_steps is None else {"join_max_steps": args.join_max_steps}
        settings = Settings(model=str(base), auth="none", **joins)
        engine = Engine(settings, load_base_model(settings)).start()
        tokens = dict.fromkeys(jobs, 0)
        ttft: dict[str, list[float]] = {tenant: [] for tenant in jobs}
        stop, lock = threading.Event(), threading.Lock()

        def client(tenant: str, n: int, i: int) -> None:
            while not stop.is_set():
                done, sent, first = threading.Event(), time.monotonic(), []

                def emit(event) -> None:
                    if isinstance(event, TokenEvent):
                        with lock:
                            if not first:
                                first.append(time.monotonic() - sent)
                            tokens[tenant] += len(event.token_ids)
                    elif isinstance(event, (FinishEvent, ErrorEvent)):
                        done.set()

                engine.submit(tenant, GenerateInput(prompt=prompts[i % len(prompts)], max_new_tokens=n, ignore_eos=True),
                              emit)
                done.wait(120)
                with lock:
                    ttft[tenant] += first

        threads = [threading.Thread(target=client, args=(tenant, n, i), daemon=True)
                   for tenant, n in jobs.items() for i in range(16)]
        try:
            for thread in threads:
                thread.start()
            time.sleep(5)
            with lock:
                tokens.update(dict.fromkeys(jobs, 0))
                for times in ttft.values():
                    times.clear()
            time.sleep(args.window_s)
            with lock:
                got, first = dict(tokens), {tenant: list(times) for tenant, times in ttft.items()}
        finally:
            stop.set()
            for thread in threads:
                thread.join(150)
            engine.stop()
    total = sum(got.values())
    print(f"| {args.root} | {args.join_max_steps} | {got['long']} | {got['short']} | {got['short'] / total:.3f} | "
          f"{1000 * statistics.median(first['short']):.0f} | {1000 * statistics.median(first['long']):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

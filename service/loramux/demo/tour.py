"""`loramux demo`: build the demo assets (once), start a server on loopback, and use it
through the client: load adapters, generate with each, stream, merge, check, shut down."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

PROMPT = "The captain"


def run_demo(cache_dir: str | None = None, rebuild: bool = False) -> int:
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from loramux.demo.build import build_demo_assets
        from loramux.server.app import BackgroundServer
        from loramux.server.tenancy.keys import append_key
        from loramux.server.settings import Settings
    except ImportError as e:
        print(f"the demo needs the server extra: pip install 'loramux[server]' ({e})")
        return 2
    from loramux.client import Client

    logging.basicConfig(level=logging.WARNING)
    started = time.monotonic()
    root = Path(cache_dir or ".demo").resolve()
    print(f"1. assets in {root}")
    build_demo_assets(root, rebuild=rebuild, log=print)
    with tempfile.TemporaryDirectory(prefix="loramux-demo-merge-") as merge_root:
        keys_file = Path(merge_root) / ".keys.yaml"  # the operator's key, made for this run (`loramux keys create`)
        key = append_key(keys_file, "demo", "operator", "demo")
        settings = Settings(
            model=str(root / "base"),
            adapter_roots=(root / "adapters",),
            merge_root=Path(merge_root) / "out",
            adapter_slots=2,
            max_lora_rank=16,
            auth_keys_file=keys_file,
        )
        with BackgroundServer(settings) as server, Client(server.target, api_key=key) as client:
            info = client.server_info()
            print(f"2. serving {Path(info.model_id).name} on {server.target} ({info.device}, {info.dtype}, "
                  f"{info.adapter_slots} adapter slots)")
            for name in ("pirate", "robot"):
                a = client.load_adapter(name, source=name, warm=(name == "pirate"))
                print(f"3. loaded {a.adapter_id!r}: rank {a.rank}, {len(a.target_modules)} module types, tier {a.tier}")
            outputs = {}
            print(f"4. greedy generation for {PROMPT!r}:")
            for adapter in ("", "pirate", "robot"):
                result = client.generate(prompt=PROMPT, adapter_id=adapter, max_new_tokens=24)
                outputs[adapter] = result
                print(f"   {adapter or 'base':>7}: {result.text!r}")
            print("5. streaming with 'robot': ", end="", flush=True)
            for chunk in client.generate_stream(prompt="The crew", adapter_id="robot", max_new_tokens=24):
                print(chunk.text, end="", flush=True)
            print()
            print("6. merging 'pirate' into the base ...")
            handle = client.merge("pirate", "pirate-merged")
            merged = handle.result(timeout=120)
            # The server names the output under the tenant's directory of its merge root.
            written = settings.merge_root / "demo" / merged.output_path
            print(f"   wrote {written} ({merged.merged_tensors} tensors merged)")
            tokenizer = AutoTokenizer.from_pretrained(written)
            model = AutoModelForCausalLM.from_pretrained(written, dtype=torch.float32).eval()
            ids = tokenizer(PROMPT, return_tensors="pt").input_ids
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=24, do_sample=False)
            merged_ids = out[0, ids.shape[1]:].tolist()
            same = merged_ids == outputs["pirate"].token_ids
            print(f"   merged model with plain transformers: {tokenizer.decode(merged_ids, skip_special_tokens=True)!r}")
            print(f"   equals the served adapter's tokens: {same}")
            print("7. adapters:", ", ".join(f"{a.adapter_id} ({a.tier}, {a.use_count} uses)" for a in client.list_adapters()))
        print(f"8. server stopped. Demo took {time.monotonic() - started:.1f}s.")
    differs = len({outputs[k].text for k in outputs}) == 3
    if not (same and differs):
        print("DEMO FAILED: " + ("merged output differs from the adapter's" if not same else "adapters did not change the text"))
        return 1
    return 0

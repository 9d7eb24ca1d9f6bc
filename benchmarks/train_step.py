"""Train-step benchmark: full fine-tuning vs LoRA in peftjax, and PyTorch PEFT LoRA, on one
Llama-shaped model and batch, side by side in one run.

    python benchmarks/train_step.py                 # CPU: a small Llama shape, float32
    python benchmarks/train_step.py --size 1b       # GPU: TinyLlama-1.1B shape, bfloat16
    python benchmarks/train_step.py --size 8b       # GPU: Llama-3-8B shape, bfloat16, LoRA only

Each case runs in its own process (clean peak memory) on random weights and random tokens:
  peftjax_full     every weight trains (AdamW over all parameters)
  peftjax_lora     LoRA r=16, alpha 32 on q/k/v/o/gate/up/down (AdamW over the adapters)
  torch_peft_lora  the same LoRA with PyTorch + PEFT (eager, SDPA attention, torch AdamW)
  torch_full       full fine-tuning in PyTorch (transformers' model, torch AdamW)
  peftjax_lora_xla_attention  peftjax_lora with attention on the plain-jnp path (on a GPU the
                   default is cuDNN's flash attention, on one TPU the splash kernel, so this
                   row shows what the kernel gains; a default case of the GPU sizes only, as
                   on a CPU both rows are the same)
No gradient checkpointing in any case (PEFT's default), same optimizer settings (lr 1e-4,
clip 1.0). Reported: median step time over --steps timed steps after --warmup, tokens/s,
memory (device peak on GPU; process peak RSS on CPU; plus XLA's compiled buffer sizes for
JAX), and ratios against PyTorch PEFT's LoRA and against PyTorch doing the same kind of
training (full against full, LoRA against LoRA). The table is printed and written to
benchmarks/results/train_step_<size>_<device>.md. On a GPU whose bf16 peak is known (A100,
H100, H200) the table has MFU: the step's matrix FLOPs (forward 2 x matrix parameters + 4 x
layers x seq x attention width per token; full fine-tuning 3x the forward, LoRA 2x: the base
gets no weight gradients, the adapters' FLOPs are not counted) over step time x peak.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import statistics
import sys
import time

from _results import report, run_case, write_result

SIZES = {
    # hidden, intermediate, layers, heads, kv heads, vocab, batch, seq, dtype
    "cpu": dict(hidden=512, intermediate=1408, layers=6, heads=8, kv_heads=8, vocab=8192,
                batch=4, seq=256, dtype="float32"),
    "1b": dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000,
               batch=4, seq=1024, dtype="bfloat16"),
    "8b": dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256,
               batch=1, seq=2048, dtype="bfloat16"),
    # keeps the script runnable in the test suite
    "tiny": dict(hidden=64, intermediate=96, layers=2, heads=4, kv_heads=2, vocab=128,
                 batch=2, seq=16, dtype="float32"),
}
CASES = ("peftjax_full", "peftjax_lora", "torch_full", "torch_peft_lora",
         "peftjax_lora_xla_attention")
CPU_SIZES = ("cpu", "tiny")
FULL_CASES = ("peftjax_full", "torch_full")  # left out at 8b: AdamW over 8B does not fit 80 GB
BF16_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense, per GPU
SAME_KIND = {"peftjax_full": "torch_full", "peftjax_lora": "torch_peft_lora",
             "peftjax_lora_xla_attention": "torch_peft_lora",
             "torch_full": "torch_full", "torch_peft_lora": "torch_peft_lora"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LR, RANK, ALPHA = 1e-4, 16, 32


def hf_config(s):
    import transformers
    return transformers.LlamaConfig(
        vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"], max_position_embeddings=max(2048, s["seq"]),
        tie_word_embeddings=False)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_jax(case: str, s: dict, steps: int, warmup: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from peftjax import LoraConfig, get_peft_model, set_attention_implementation
    from peftjax.models._decoder import DecoderForCausalLM
    from peftjax.models.llama import parse_config
    from peftjax.train import OptimizerConfig, make_optimizer, make_train_step, split_model

    dtype = jnp.dtype(s["dtype"])
    cfg = parse_config(hf_config(s).to_dict())
    model = DecoderForCausalLM(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    if case == "peftjax_lora_xla_attention":
        set_attention_implementation("xla")
    if case.startswith("peftjax_lora"):
        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS),
                               rngs=nnx.Rngs(1))
    graphdef, trainable, frozen = split_model(model)
    n_train = sum(x.size for x in jax.tree.leaves(trainable))
    n_total = n_train + sum(x.size for x in jax.tree.leaves(frozen))
    del model
    optimizer = make_optimizer(OptimizerConfig(learning_rate=LR, max_grad_norm=1.0))
    opt_state = optimizer.init(trainable)
    step = make_train_step(graphdef, optimizer, task="causal_lm")
    rng = np.random.default_rng(0)
    batches = [{"input_ids": jnp.asarray(ids), "attention_mask": jnp.ones_like(jnp.asarray(ids)),
                "labels": jnp.asarray(ids)}
               for ids in (rng.integers(0, s["vocab"], (s["batch"], s["seq"])) for _ in range(2))]
    t0 = time.perf_counter()
    compiled = step.lower(trainable, opt_state, frozen, batches[0], None).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    compiled_bytes = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                      - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
    times = []
    for i in range(warmup + steps):
        t = time.perf_counter()
        trainable, opt_state, metrics = step(trainable, opt_state, frozen, batches[i % 2], None)
        loss = float(metrics["loss"])  # waits for the step
        if i >= warmup:
            times.append(time.perf_counter() - t)
    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    return dict(step_s=statistics.median(times), loss=loss, compile_s=compile_s,
                trainable=n_train, total=n_total, compiled_bytes=compiled_bytes,
                temp_bytes=mem.temp_size_in_bytes,
                device_peak=(stats or {}).get("peak_bytes_in_use"), rss=peak_rss_bytes(),
                device=f"{dev.platform}: {dev.device_kind}")


def run_torch(case: str, s: dict, steps: int, warmup: int) -> dict:
    import peft
    import torch
    import transformers

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = getattr(torch, s["dtype"])
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs (8B in float32 is 32 GB of host RAM)
        model = transformers.LlamaForCausalLM(hf_config(s)).to(dtype=dtype)
    if case == "torch_peft_lora":
        model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=ALPHA,
                                                           target_modules=TARGETS,
                                                           task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    if case == "torch_peft_lora":
        for p in params:  # as peftjax: adapters in float32 over a bf16 base
            p.data = p.data.float()
    n_train = sum(p.numel() for p in params)
    n_total = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, s["vocab"], (s["batch"], s["seq"]), generator=g).to(device)
               for _ in range(2)]
    model.train()
    times = []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        ids = batches[i % 2]
        with torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()  # waits for the step
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return dict(step_s=statistics.median(times), loss=value, compile_s=0.0, trainable=n_train,
                total=n_total, compiled_bytes=None, temp_bytes=None,
                device_peak=torch.cuda.max_memory_allocated() if cuda else None,
                rss=peak_rss_bytes(),
                device=torch.cuda.get_device_name() if cuda else f"cpu: torch {torch.__version__}")


def _gib(b):
    return "-" if b is None else f"{b / 2**30:.2f}"


def step_flops(case: str, s: dict) -> float:
    """Matrix FLOPs of one train step (see the module doc)."""
    h, d = s["hidden"], s["hidden"] // s["heads"]
    per_layer = 2 * h * h + 2 * h * s["kv_heads"] * d + 3 * h * s["intermediate"]
    matrix_params = s["layers"] * per_layer + h * s["vocab"]
    forward = 2 * matrix_params + 4 * s["layers"] * s["seq"] * h
    return (3 if case in FULL_CASES else 2) * forward * s["batch"] * s["seq"]


def mfu(case: str, s: dict, r: dict) -> str:
    peak = next((v for k, v in BF16_PEAK_FLOPS.items() if k in r["device"]), None)
    if peak is None or s["dtype"] != "bfloat16":
        return "-"
    return f"{100 * step_flops(case, s) / r['step_s'] / peak:.1f}%"


def table(results: dict, s: dict, args) -> str:
    tokens = s["batch"] * s["seq"]
    ref = results.get("torch_peft_lora")
    gpu = any(r.get("device_peak") for r in results.values())
    mem_key = "device_peak" if gpu else "rss"
    mem_name = "device peak GiB" if gpu else "peak RSS GiB"
    lines = [f"Train step, Llama shape {s} ({tokens} tokens/step), median of {args.steps} steps "
             f"after {args.warmup} warmup; {datetime.date.today()}, "
             f"{platform.node() or 'host'}, {os.cpu_count()} CPU cores.", "",
             f"| case | device | trainable / total params | step ms | tokens/s | tokens/s vs PEFT "
             f"| tokens/s vs torch, same kind | {mem_name} | memory vs PEFT | "
             f"XLA compiled GiB (temp) | compile s | MFU | loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for case, r in results.items():
        tps = tokens / r["step_s"]
        speed = f"{(ref['step_s'] / r['step_s']):.2f}x" if ref else "-"
        same = results.get(SAME_KIND[case])
        same_speed = f"{(same['step_s'] / r['step_s']):.2f}x" if same else "-"
        mem = r.get(mem_key)
        mem_ratio = f"{mem / ref[mem_key]:.2f}x" if ref and mem and ref.get(mem_key) else "-"
        xla = (f"{_gib(r['compiled_bytes'])} ({_gib(r['temp_bytes'])})"
               if r["compiled_bytes"] is not None else "-")
        lines.append(f"| {case} | {r['device']} | {r['trainable']:,} / {r['total']:,} | "
                     f"{1000 * r['step_s']:.1f} | {tps:,.0f} | {speed} | {same_speed} | {_gib(mem)} | {mem_ratio} "
                     f"| {xla} | {r['compile_s']:.1f} | {mfu(case, s, r)} | {r['loss']:.3f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="cpu")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--cases", default=None,
                    help=f"comma-separated, from {', '.join(CASES)} (default: all; the CPU sizes "
                         "leave out peftjax_lora_xla_attention)")
    ap.add_argument("--out", default=None, help="table file (default benchmarks/results/...)")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = ap.parse_args()
    s = SIZES[args.size]
    if args.case:
        r = (run_torch(args.case, s, args.steps, args.warmup) if args.case.startswith("torch")
             else run_jax(args.case, s, args.steps, args.warmup))
        report(r)
        return
    results = {}
    cases = args.cases or ",".join(
        c for c in CASES if (args.size not in CPU_SIZES or c != "peftjax_lora_xla_attention")
        and (args.size != "8b" or c not in FULL_CASES))
    for case in cases.split(","):
        if case not in CASES:
            sys.exit(f"unknown case {case!r}; choose from {', '.join(CASES)}")
        print(f"running {case} ...", flush=True)
        results[case] = run_case(__file__, "--case", case, "--size", args.size,
                                 "--steps", str(args.steps), "--warmup", str(args.warmup))
    text = table(results, s, args)
    print(text)
    device = "gpu" if any(r.get("device_peak") for r in results.values()) else "cpu"
    print(f"written to {write_result(text, args.out, f'train_step_{args.size}_{device}')}")


if __name__ == "__main__":
    main()

"""The "what each change bought" figures of docs/benchmarks.md: each change against its alternative, in one process.

    python -m benchmarks.ablations sdpa          # SDPA's flash kernel against the math path, fwd + bwd
    python -m benchmarks.ablations generate      # fused Q/K/V and a key-mask shortcut, A/B with identical tokens
    python -m benchmarks.ablations processor     # JPEG files decoded at reduced scale or in full (Flickr8k)
    python -m benchmarks.ablations profile       # where a training step (base) and a generated token (mini-112) go
    python -m benchmarks.ablations compile       # torch.compile and a static KV cache, against eager (minutes: compiling)
    python -m benchmarks.ablations malloc        # glibc malloc keeping freed activations (fewer page faults), both sides

A and B take turns and each keeps its fastest time, so a noisy machine slows both alike.
"""

import glob
import os
import tempfile
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import HfArgumentParser

import training
from benchmarks import speed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def times_in_turns(fns: dict, rounds: int) -> dict[str, list[float]]:
    """{name: seconds of each of `rounds` calls}: each round calls every fn once, in turn, so that a machine whose
    speed drifts slows every side alike."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def best_of(fns: dict, rounds: int) -> dict:
    """{name: fastest seconds of `rounds` turns}: each round calls every fn once, in turn."""
    return {name: min(t) for name, t in times_in_turns(fns, rounds).items()}


def scene_batch(preset: str | None = None, size: int = 32):
    """(train.py's collated batch of the first `size` training scenes, its processor) for `preset`
    (default: train.py's), with a tokenizer trained on 2,000 scene texts."""
    from processing import scenes

    model_args = training.parse_args([] if preset is None else ["--preset", preset])[0]
    with tempfile.TemporaryDirectory() as work:
        processor = training.build_processor(model_args, scenes.scene_texts(2000), training.image_size_of(model_args), work)
    return speed.fixed_batch(processor, size), processor


def training_step(model, optimizer, batch):
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def sdpa(rounds: int = 20):
    shapes = {"decoder, 80 tokens, causal": ((32, 8, 80, 12), True), "vision 112 px, 50 tokens": ((32, 8, 50, 50), False),
              "vision 224 px, 197 tokens": ((32, 8, 197, 64), False)}
    for label, (shape, causal) in shapes.items():
        q, k, v = (torch.randn(*shape, requires_grad=True) for _ in range(3))

        def run(backend, q=q, k=k, v=v, causal=causal):
            with sdpa_kernel(backend):
                F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward()
        best = best_of({"flash": lambda: run(SDPBackend.FLASH_ATTENTION), "math": lambda: run(SDPBackend.MATH)}, rounds)
        print(f"{label}: flash {best['flash'] * 1e3:.1f} ms, math {best['math'] * 1e3:.1f} ms, flash {best['math'] / best['flash']:.2f}x")


def _fused_attention(self, hidden_states, attention_mask=None, cache=None, output_attentions=False):
    B, T, C = hidden_states.shape
    q, k, v = F.linear(hidden_states, self.qkv_weight, self.qkv_bias).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx)
    is_causal = self.is_causal and attention_mask is None and (cache is None or k.shape[2] == T)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=is_causal)
    return self.o_proj(y.transpose(1, 2).reshape(B, T, C)), None


@torch.no_grad()
def generate(rounds: int = 6, new_tokens: int = 30):
    from modeling_nanovlm import modeling_nanovlm as modeling

    batch, processor = scene_batch()
    bos = processor.tokenizer.bos_token_id
    model = speed.build_model("nanovlm", training.parse_args([])[0].preset, len(processor.tokenizer)).eval()
    for module in model.modules():
        if isinstance(module, modeling.NanoVLMAttention):
            module.qkv_weight = torch.cat([module.q_proj.weight, module.k_proj.weight, module.v_proj.weight])
            module.qkv_bias = torch.cat([module.q_proj.bias, module.k_proj.bias, module.v_proj.bias])
    plain_forward = modeling.NanoVLMAttention.forward
    variants = {"as shipped": plain_forward, "fused Q/K/V": _fused_attention}
    for batch_size in (1, 32):
        inputs = speed.generate_inputs(model, batch["pixel_values"][:batch_size], bos)
        outputs = {}

        def run(name, inputs=inputs, outputs=outputs):
            modeling.NanoVLMAttention.forward = variants[name]
            outputs[name] = speed.timed_generate(model, inputs, new_tokens, 1, "cpu")[1]
        try:
            best = best_of({name: (lambda name=name: run(name)) for name in variants}, rounds)
        finally:  # the shipped attention back, whatever happened (a variant left in place would break every later caller)
            modeling.NanoVLMAttention.forward = plain_forward
        base = best["as shipped"]
        for name in variants:
            same = torch.equal(outputs[name], outputs["as shipped"])
            print(f"batch {batch_size}, {new_tokens} tokens, {name}: {best[name] * 1e3:.1f} ms, {base / best[name]:.3f}x, identical tokens: {same}")


def processor(rounds: int = 3, images: int = 256):
    from transformers import ViTImageProcessorPil

    from modeling_nanovlm import NanoVLMProcessor, processing_nanovlm
    from processing.tokenizer import train_tokenizer

    paths = sorted(glob.glob(os.path.join(ROOT, "..", "shared", "data", "flickr8k", "images", "*.jpg")))[:images]
    if not paths:
        raise SystemExit("no Flickr8k JPEGs in ../shared/data/flickr8k/images: this comparison needs real photos")
    tokenizer = train_tokenizer(["a picture"] * 10, vocab_size=300, min_frequency=1)
    reduced = processing_nanovlm.to_rgb
    for size in (112, 224):
        proc = NanoVLMProcessor(ViTImageProcessorPil(size={"height": size, "width": size}), tokenizer, num_image_tokens=1)

        def run(to_rgb, proc=proc):
            processing_nanovlm.to_rgb = to_rgb
            for i in range(0, len(paths), 32):
                proc(images=paths[i : i + 32])
        full = lambda image, name="image", min_size=None: reduced(image, name)  # noqa: E731
        best = best_of({"reduced": lambda: run(reduced), "full": lambda: run(full)}, rounds)
        processing_nanovlm.to_rgb = reduced
        print(f"{size} px: reduced-scale decode {len(paths) / best['reduced']:.0f} images/s, full decode "
              f"{len(paths) / best['full']:.0f} images/s, {best['full'] / best['reduced']:.2f}x")


def profile(rows: int = 15):
    """PyTorch's profiler on NanoVLM: a training step of base (224 px, batch 32, AdamW) and a 30-token
    caption of train.py's default preset at batch 1, each after warm-up and a timed run."""

    batch, processor = scene_batch("base", 32)
    model = speed.build_model("nanovlm", "base", len(processor.tokenizer)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        training_step(model, optimizer, batch)
    step()
    start = time.perf_counter()
    for _ in range(3):
        step()
    print(f"base training: {3 * 32 / (time.perf_counter() - start):.1f} samples/s")
    with torch.profiler.profile() as prof:
        step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    with FlopCounterMode(display=False) as counter:
        step()
    matmuls = ("mm", "addmm", "bmm")
    flops = sum(n for op, n in counter.get_flop_counts()["Global"].items() if str(op).split(".")[1] in matmuls)
    seconds = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in {f"aten::{m}" for m in matmuls}) / 1e6
    peak = speed.matmul_peak("cpu", (1024, 2048, 4096), 2.0, dtypes=("fp32",))["fp32_gflops"]
    print(f"base matmuls: {flops / 1e9:.0f} GFLOP of {counter.get_total_flops() / 1e9:.0f} in {seconds:.2f} s (profiled step):"
          f" {flops / seconds / 1e9:.0f} GFLOP/s, {flops / seconds / 1e9 / peak:.2f} of the {peak:.0f} GFLOP/s large-matmul peak")

    preset = training.parse_args([])[0].preset
    batch, processor = scene_batch(preset, 1)
    model = speed.build_model("nanovlm", preset, len(processor.tokenizer)).eval()
    inputs = speed.generate_inputs(model, batch["pixel_values"], processor.tokenizer.bos_token_id)
    with torch.no_grad():
        speed.timed_generate(model, inputs, 4, 1, "cpu")
        seconds, _ = speed.timed_generate(model, inputs, 30, 5, "cpu")
        print(f"{preset} generation, batch 1: {seconds / 30 * 1e3:.2f} ms a token")
        with torch.profiler.profile() as prof:
            speed.timed_generate(model, inputs, 30, 1, "cpu")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def compile_(rounds: int = 4, new_tokens: int = 30):
    """torch.compile on train.py's default preset: a training step (batch 32, AdamW), and generation
    with a static KV cache (the layout a compiled decoder wants) at batch 1 and 32, identical tokens."""

    batch, processor = scene_batch()
    bos = processor.tokenizer.bos_token_id
    model = speed.build_model("nanovlm", training.parse_args([])[0].preset, len(processor.tokenizer)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    compiled = torch.compile(model)

    def step(m):
        training_step(m, optimizer, batch)
    start = time.perf_counter()
    step(compiled)
    print(f"training: compiling took {time.perf_counter() - start:.0f} s")
    best = best_of({"eager": lambda: step(model), "compiled": lambda: step(compiled)}, rounds)
    print(f"training, batch 32: eager {32 / best['eager']:.1f} samples/s, compiled {32 / best['compiled']:.1f}, "
          f"compiled {best['eager'] / best['compiled']:.2f}x")

    model.eval()
    eager_forward = model.forward
    compiled_forward = torch.compile(model.forward, dynamic=True)
    variants = {"dynamic cache (as shipped)": (eager_forward, {}), "static cache": (eager_forward, {"cache_implementation": "static"}),
                "static cache, compiled": (compiled_forward, {"cache_implementation": "static"})}
    with torch.no_grad():
        for batch_size in (1, 32):
            inputs = speed.generate_inputs(model, batch["pixel_values"][:batch_size], bos)
            outputs = {}

            def run(name, inputs=inputs, outputs=outputs):
                model.forward, kwargs = variants[name]
                outputs[name] = speed.timed_generate(model, inputs, new_tokens, 1, "cpu", **kwargs)[1]
            start = time.perf_counter()
            run("static cache, compiled")
            print(f"batch {batch_size}: compiling (and a first call) took {time.perf_counter() - start:.0f} s")
            best = best_of({name: (lambda name=name: run(name)) for name in variants}, rounds)
            model.forward = eager_forward
            base = best["dynamic cache (as shipped)"]
            for name in variants:
                same = torch.equal(outputs[name], outputs["dynamic cache (as shipped)"])
                print(f"batch {batch_size}, {new_tokens} tokens, {name}: {best[name] * 1e3:.1f} ms, {base / best[name]:.2f}x, "
                      f"identical tokens: {same}")


def malloc(rounds: int = 4, steps: int = 3, presets=("mini-112", "base")):
    """glibc hands large freed blocks back to the kernel, so every training step page-faults its
    activations in again. `mallopt` can keep them (blocks up to 32 MB from the heap, no trimming):
    NanoVLM and the peer, training steps with glibc's defaults and kept, in turns in one process."""
    import ctypes
    import resource

    from benchmarks.peer import peer_inputs

    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3

    def keep(on: bool):
        libc.mallopt(M_MMAP_THRESHOLD, 32 * 2**20 if on else 128 * 2**10)
        libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1 if on else 128 * 2**10)
        if not on:
            libc.malloc_trim(0)

    for preset in presets:
        batch, processor = scene_batch(preset, 32)
        inputs = {"nanovlm": batch, "peer": peer_inputs(batch)}
        models = {side: speed.build_model(side, preset, len(processor.tokenizer)).train() for side in inputs}
        optimizers = {side: torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for side, m in models.items()}
        faults = {}

        def run(side, on):
            keep(on)
            for _ in range(steps):  # settle into this setting
                training_step(models[side], optimizers[side], inputs[side])
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            for _ in range(steps):
                training_step(models[side], optimizers[side], inputs[side])
            faults[side, on] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // steps
            return time.perf_counter() - start
        times = {(side, on): [] for side in models for on in (False, True)}
        for _ in range(rounds):
            for key in times:
                times[key].append(run(*key))
        keep(False)
        for side in models:
            default, kept = (32 * steps / min(times[side, on]) for on in (False, True))
            print(f"{preset} {side}: glibc defaults {default:.1f} samples/s ({faults[side, False]:,} page faults a step), "
                  f"blocks kept {kept:.1f} ({faults[side, True]:,}), {kept / default:.2f}x")


def main(argv=None):
    parser = HfArgumentParser((), description=__doc__.splitlines()[0])
    which = {"sdpa": sdpa, "generate": generate, "processor": processor, "profile": profile, "compile": compile_, "malloc": malloc}
    parser.add_argument("which", choices=which, help="the ablation to run")
    which[parser.parse_args(argv).which]()


if __name__ == "__main__":
    main()

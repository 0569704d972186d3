"""The timed measurements. Each runs in a fresh process (`isolated`) so that its peak memory is its own.

Processes are forked from a server that has imported torch, transformers and train.py once, so
a measurement does not pay for those imports again; `rss_at_start_mb` is what it inherits from
that server, `peak_rss_mb` its own high-water mark (inherited pages included).
"""

import multiprocessing
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop, sdpa_flop
from transformers import Trainer, TrainerCallback, TrainingArguments, VisionEncoderDecoderModel, default_data_collator
from transformers.trainer_callback import PrinterCallback

import training  # train.py's helpers (run from the repository root): its defaults are "NanoVLM as a user runs it"
from benchmarks.peer import build_peer, peer_inputs
from modeling_nanovlm import NanoVLMProcessor
from processing import scenes
from processing.collator import NanoVLMCollator

# PyTorch's FLOP counter knows the GPU attention kernels but not the CPU one SDPA picks here
# (same arguments, so the same formulas; `__wrapped__`: the counter wraps custom formulas itself).
CPU_SDPA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_flop.__wrapped__,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: sdpa_backward_flop.__wrapped__,
}
SIDES = ("nanovlm", "peer")


def isolated(fn, device: str, threads: int, **kwargs) -> dict:
    """`fn(device=device, **kwargs)` in a new process; its result plus that process's peak memory."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(_measure, fn, device, threads, kwargs).result()


def _measure(fn, device, threads, kwargs) -> dict:
    torch.set_num_threads(threads)
    rss_at_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = fn(device=device, **kwargs)
    result.update(peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  rss_at_start_mb=round(rss_at_start, 1))
    if device == "cuda":
        result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


def fixed_batch(processor, batch_size: int) -> dict:
    """train.py's collator over the first `batch_size` training scenes: the batch every timing uses
    (drawn at the processor's image size)."""
    size = processor.image_processor.size["height"]
    examples = [scenes.make_example(scenes.example_seed(scenes.TRAIN_SEED, i), image_size=size) for i in range(batch_size)]
    return NanoVLMCollator(processor, max_length=128)(examples)


def synchronize(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def build_model(side: str, preset: str, vocab_size: int, seed: int = 0):
    """NanoVLM as train.py builds it for `preset` (its default visual tokens), or its peer."""
    model_args = training.parse_args(["--preset", preset])[0]
    torch.manual_seed(seed)
    model = training.build_model(model_args, vocab_size)
    if side == "peer":
        torch.manual_seed(seed)
        model = build_peer(model.config)
    return model


def training_arguments(side: str, batch_size: int, max_steps: int, device: str, bf16: bool, **overrides):
    """NanoVLM: train.py's defaults. The peer: the Trainer's defaults. Both: this batch and precision,
    no checkpoints or evaluations (`fit` gives the output folder)."""
    common = dict(output_dir="unused", per_device_train_batch_size=batch_size, max_steps=max_steps, bf16=bf16,
                  use_cpu=device == "cpu", save_strategy="no", eval_strategy="no", disable_tqdm=True, report_to="none")
    common.update(overrides)
    if side == "peer":
        return TrainingArguments(**common)
    return training.parse_args([a for k, v in common.items() for a in (f"--{k}", str(v))])[2]


def fit(model, args: TrainingArguments, dataset, collator, callback: TrainerCallback, trainer_class=Trainer, **kwargs):
    """`trainer_class(...).train()` in a temporary output folder, without printing its logs."""
    with tempfile.TemporaryDirectory() as out:
        args.output_dir = out
        trainer = trainer_class(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[callback], **kwargs)
        trainer.remove_callback(PrinterCallback)
        trainer.train()


def training_flops(model, inputs: dict, device: str) -> int:
    """FLOPs of one forward + backward pass (PyTorch's counter: matmuls, convolutions, attention)."""
    model.to(device).train()
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FLOPS) as counter:
        model(**{k: v.to(device) for k, v in inputs.items()}).loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


class StepClock(TrainerCallback):
    """Times each step; stops training once `steps` steps after the `warmup` ones took `min_seconds`."""

    def __init__(self, device, warmup=0, steps=None, min_seconds=0.0):
        self.device, self.times = device, []
        self.warmup, self.steps, self.min_seconds = warmup, steps, min_seconds

    def on_step_end(self, args, state, control, **kwargs):
        synchronize(self.device)
        self.times.append(time.perf_counter())
        timed = len(self.times) - self.warmup
        if self.steps is not None and timed >= self.steps and self.times[-1] - self.times[self.warmup - 1] >= self.min_seconds:
            control.should_training_stop = True


class Repeated(torch.utils.data.Dataset):
    """`length` rows cycling over the rows of one batch."""

    def __init__(self, inputs: dict, length: int):
        self.inputs, self.size, self.length = inputs, len(next(iter(inputs.values()))), length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        return {k: v[i % self.size] for k, v in self.inputs.items()}


def train_speed(device, side, preset, batch, vocab_size, steps, warmup, bf16, min_seconds=0.0, count_flops=False,
                peak_sizes=(), peak_seconds=0.0, gradient_checkpointing=False) -> dict:
    """Training samples/s (forward, backward, AdamW step) through the Trainer, on one fixed batch:
    at least `steps` timed steps after `warmup` ones, and at least `min_seconds` of them.

    `count_flops`: also the FLOPs of one step. `peak_sizes`: then the matmul peak at this precision,
    measured right after in this process, so that an MFU pairs two figures taken at the same time
    (this machine's speed drifts over minutes). `gradient_checkpointing`: train with --gradient_checkpointing."""
    model = build_model(side, preset, vocab_size)
    inputs = batch if side == "nanovlm" else peer_inputs(batch)
    size = len(batch["input_ids"])
    result = {"batch_size": size, "warmup_steps": warmup, "bf16": bf16, "parameters": model.num_parameters(),
              "gradient_checkpointing": gradient_checkpointing}
    if count_flops:
        result["flops_per_step"] = training_flops(model, inputs, device)
    max_steps = warmup + max(steps, 100_000)  # the clock stops it
    clock = StepClock(device, warmup, steps, min_seconds)
    args = training_arguments(side, size, max_steps, device, bf16, gradient_checkpointing=gradient_checkpointing)
    fit(model, args, Repeated(inputs, size * max_steps), default_data_collator, clock)
    timed = len(clock.times) - warmup
    seconds = clock.times[-1] - clock.times[warmup - 1]
    result.update(steps=timed, seconds=round(seconds, 3), samples_per_s=size * timed / seconds)
    if peak_sizes:
        result["matmul_peak_after"] = matmul_peak(device, peak_sizes, peak_seconds, dtypes=("bf16",) if bf16 else ("fp32",))
    return result


def generate_inputs(model, pixel_values, bos):
    """The captioning prompt of each image: the peer's pixel values alone; NanoVLM's image tokens and `<bos>`."""
    if isinstance(model, VisionEncoderDecoderModel):
        return {"pixel_values": pixel_values}
    prompt = [model.config.image_token_id] * model.config.num_image_tokens + [bos]
    ids = torch.tensor([prompt] * len(pixel_values), dtype=torch.long, device=pixel_values.device)
    return {"pixel_values": pixel_values, "input_ids": ids, "attention_mask": torch.ones_like(ids)}


def timed_generate(model, inputs, new_tokens, reps, device, **kwargs):
    """(seconds of the fastest of `reps` calls, output ids) of greedy generation of exactly `new_tokens`
    tokens (<eos> suppressed)."""
    kwargs = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    outputs = []
    seconds = min(_seconds(lambda: outputs.append(model.generate(**inputs, **kwargs)), device) for _ in range(reps))
    prompt = inputs["input_ids"].shape[1] if "input_ids" in inputs else 1  # NanoVLM: image tokens and <bos>; the peer: decoder_start
    if outputs[-1].shape[1] != prompt + new_tokens:
        raise AssertionError(f"generated {outputs[-1].shape[1] - prompt} tokens, not {new_tokens}")
    return seconds, outputs[-1][:, prompt:]


@torch.no_grad()
def generate_speed(device, preset, vocab_size, pixel_values, bos, lengths, reps, bf16) -> dict:
    """Captions/s of greedy `generate()`, NanoVLM's and the peer's, for each batch size in `reps` and
    each caption length. The two take turns call by call in this one process and each keeps its
    fastest of `reps[batch_size]` calls, so a change in the machine's speed slows both alike."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    models = {side: build_model(side, preset, vocab_size).to(device, dtype).eval() for side in SIDES}
    result = {side: {"bf16": bf16} for side in SIDES}
    for batch_size, batch_reps in reps.items():
        inputs = {side: generate_inputs(models[side], pixel_values[:batch_size].to(device), bos) for side in SIDES}
        for side in SIDES:
            timed_generate(models[side], inputs[side], 4, 1, device)  # warm-up
        for n in lengths:
            seconds = {side: [] for side in SIDES}
            for _ in range(batch_reps):
                for side in SIDES:
                    seconds[side].append(timed_generate(models[side], inputs[side], n, 1, device)[0])
            for side in SIDES:
                fastest = min(seconds[side])
                result[side][f"batch_{batch_size}_tokens_{n}"] = {"captions_per_s": batch_size / fastest, "seconds_per_call": fastest}
    return result


@torch.no_grad()
def cache_speed(device, preset, vocab_size, pixel_values, bos, new_tokens, reps, bf16) -> dict:
    """NanoVLM generation with its KV cache and without (`use_cache=False`), which must agree token for token."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    model = build_model("nanovlm", preset, vocab_size).to(device, dtype).eval()
    inputs = generate_inputs(model, pixel_values.to(device), bos)
    timed_generate(model, inputs, 4, 1, device)
    cached, out_cached = timed_generate(model, inputs, new_tokens, reps, device)
    uncached, out_uncached = timed_generate(model, inputs, new_tokens, reps, device, use_cache=False)
    if not torch.equal(out_cached, out_uncached):
        raise AssertionError("cached and uncached generation gave different tokens")
    return {"batch_size": len(pixel_values), "new_tokens": new_tokens, "bf16": bf16, "tokens_identical": True,
            "cached_seconds": cached, "uncached_seconds": uncached}


def processor_speed(device, processor_dir, image_paths, batch_size) -> dict:
    """Images/s of train.py's processor (decode, RGB, resize, normalize) on image files."""
    processor = NanoVLMProcessor.from_pretrained(processor_dir)
    processor(images=image_paths[:batch_size])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(image_paths), batch_size):
        processor(images=image_paths[i : i + batch_size])
    seconds = time.perf_counter() - start
    return {"images": len(image_paths), "batch_size": batch_size, "seconds": seconds, "images_per_s": len(image_paths) / seconds}


def matmul_peak(device, sizes, seconds, dtypes=("fp32", "bf16")) -> dict:
    """This machine's large-matmul rate in GFLOP/s, fp32 and bf16: the fastest call of any size.

    Sizes go up until a single call takes over half of `seconds` (bf16 on a CPU without bf16
    instructions runs a slow fallback: minutes for a 4096 product).
    """
    result = {"sizes": list(sizes)}
    for name in dtypes:
        dtype, best = {"fp32": torch.float32, "bf16": torch.bfloat16}[name], 0.0
        for n in sizes:
            a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
            times, start = [], time.perf_counter()
            while len(times) < 2 or time.perf_counter() - start < seconds:  # the first call is a warm-up
                times.append(_seconds(lambda: a @ b, device))
            best = max(best, 2 * n**3 / min(times[1:]) / 1e9)
            if times[0] > seconds / 2:
                break
        result[f"{name}_gflops"] = best
    return result


def _seconds(fn, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start

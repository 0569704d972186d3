"""python -m benchmarks on tiny settings: the peer matches NanoVLM's sizes and targets, and the report
holds every figure with sane values (no timing targets: this machine is shared)."""

import json

import pytest
import torch
from conftest import toy_image

from benchmarks.__main__ import TARGETS, Settings, run
from benchmarks.peer import build_peer, peer_inputs
from benchmarks.sizes import preset_sizes
from benchmarks.table import markdown
from processing.collator import NanoVLMCollator

TINY = Settings(
    presets=["mini"], batch_size=4, train_steps=1, train_seconds=0.0, train_repeats=2, warmup_steps=1, lengths=[3, 5],
    generate_batch_sizes=[1, 4], generate_calls=[1, 1], cache_reps=1, processor_images=4, matmul_sizes=[128], matmul_seconds=0.05,
    mfu_preset="mini", bf16_steps=1, bf16_mfu=True,
    ttq_seconds=1.0, ttq_eval_seconds=1.0, ttq_train_examples=8, ttq_validation_examples=4, tokenizer_texts=200,
    checkpointing_preset="mini", checkpointing_steps=1,
)


def test_peer_has_nanovlm_sizes_and_targets(tester, processor, images):
    config = tester.get_config()
    peer = build_peer(config)
    vit, gpt2 = peer.config.encoder, peer.config.decoder
    assert (vit.image_size, vit.patch_size, vit.hidden_size, vit.num_hidden_layers, vit.num_attention_heads, vit.intermediate_size) == (
        config.image_size, config.patch_size, config.vision_hidden_size, config.vision_num_hidden_layers,
        config.vision_num_attention_heads, config.vision_intermediate_size)
    assert (gpt2.n_embd, gpt2.n_layer, gpt2.n_head, gpt2.n_inner, gpt2.vocab_size) == (
        config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size, config.vocab_size)
    assert gpt2.add_cross_attention
    batch = NanoVLMCollator(processor)([{"image": im, "text": t} for im, t in zip(images[:3], ["a b", "a red ball", "x"])])
    inputs = peer_inputs(batch)
    # The peer reads <bos> text and predicts text <eos>: NanoVLM's decoder inputs and targets after its image tokens.
    text = batch["input_ids"][:, processor.num_image_tokens:]  # <bos> text <eos> (pads)
    decoder_ids = peer.prepare_decoder_input_ids_from_labels(inputs["labels"])
    assert torch.equal(decoder_ids, text[:, :-1])
    assert torch.equal(inputs["labels"], batch["labels"][:, processor.num_image_tokens + 1:])
    assert peer(**inputs).loss.isfinite()


def test_benchmark_report_has_every_figure(tmp_path):
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    for i in range(4):
        toy_image(i, size=64).save(image_dir / f"{i}.jpg")
    report = json.loads(json.dumps(run(TINY, threads=1, image_dir=str(image_dir))))  # plain JSON

    for key in (*TARGETS, "date", "machine", "git", "versions", "parameters", "train", "generate", "cache", "processor",
                "matmul_peak", "mfu", "time_to_quality", "targets"):
        assert key in report, key
    assert report["machine"]["threads"] == 1 and report["machine"]["device"] == "cpu"
    assert report["versions"]["torch"] == torch.__version__
    assert set(report["targets"]) == set(TARGETS)

    sizes = report["parameters"]["mini"]
    assert sizes["nanovlm_vocab_25000"] == preset_sizes()["mini"]["total"]
    assert sizes["peer_vocab_25000"] > 0 and sizes["nanovlm"] < sizes["nanovlm_vocab_25000"]

    for setup in ("as_user_runs_it", "equal_precision"):
        for side in ("nanovlm", "peer"):
            run_ = report["train"]["mini"][setup][side]
            assert run_["samples_per_s"] > 0 and run_["batch_size"] == 4 and run_["steps"] >= 1
            assert run_["samples_per_s"] == max(run_["samples_per_s_repeats"]) and len(run_["samples_per_s_repeats"]) == 2
            assert run_["peak_rss_mb"] >= run_["rss_at_start_mb"] > 0
            assert run_["flops_per_step"] > 0 and run_["achieved_gflops"] > 0
    assert report["train_speedup_vs_peer"] > 0 and report["train_speedup_vs_peer_equal_precision"] > 0
    assert set(report["generate_speedup_vs_peer"]) == {"batch_1", "batch_4"}
    assert all(v > 0 for by_length in report["generate_speedup_vs_peer"].values() for v in by_length.values())
    assert report["cache"]["tokens_identical"] and report["cache_speedup"] > 0

    # A forward + backward pass costs at least 6 FLOPs per vision-tower weight and patch token.
    vision = preset_sizes()["mini"]["vision"]
    assert report["mfu"]["flops_per_step"] > 6 * vision * 196 * 4
    assert 0 < report["mfu_fp32"] < 10 and report["mfu_bf16"] > 0
    fp32 = report["mfu"]["fp32_train"]  # each repeat paired with a matmul peak taken right after it, in its process
    assert len(fp32["mfu_repeats"]) == 2 and fp32["matmul_peak_after"]["fp32_gflops"] > 0
    assert min(fp32["mfu_repeats"]) <= report["mfu_fp32"] <= max(fp32["mfu_repeats"])
    assert report["mfu"]["fp32_vs_run_start_peak"] > 0
    assert report["processor"]["images"] == 4 and report["data_to_train_ratio"] > 0
    checkpointing = report["gradient_checkpointing"]  # the same training step with and without recomputed blocks
    assert checkpointing["off"]["gradient_checkpointing"] is False and checkpointing["on"]["gradient_checkpointing"] is True
    assert checkpointing["on"]["samples_per_s"] > 0 and checkpointing["peak_saving_mb"] == pytest.approx(
        checkpointing["off"]["peak_rss_mb"] - checkpointing["on"]["peak_rss_mb"])

    for side in ("nanovlm", "peer"):
        points = report["time_to_quality"][side]["points"]
        assert points and all(0 <= p["object_recall"] <= 1 and p["eval_loss"] > 0 for p in points)
    assert "object_recall" in report["time_to_quality"]["summary"]

    table = markdown(report)  # docs/benchmarks.md's tables: every goal, every preset, every generation setting
    assert all(f"| `{key}` |" in table for key in TARGETS)
    assert "| mini | " in table and "| 1, 3 | " in table and "| 4, 5 | " in table
    assert f"{report['cache_speedup']:.1f}x, identical tokens" in table
    assert "- Gradient checkpointing (mini, batch 4): peak_rss_mb" in table


def test_ablations_compare_variants_that_write_the_same_tokens(capsys):
    """`python -m benchmarks.ablations generate`: the fused Q/K/V variant it times must generate exactly
    what the shipped model does, or its timings mean nothing."""
    from benchmarks import ablations
    from modeling_nanovlm import modeling_nanovlm as modeling

    forward = modeling.NanoVLMAttention.forward
    ablations.generate(rounds=1, new_tokens=4)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("batch")]
    assert len(lines) == 4 and all(line.endswith("identical tokens: True") for line in lines), lines
    assert modeling.NanoVLMAttention.forward is forward  # restored


@pytest.mark.parametrize("name", ["mini-112", "base-112"])
def test_decoder_heavy_presets_hold_the_same_total_with_30_percent_in_the_vision_tower(name):
    """`-dec` is the allocation sweep's best split at the preset's total: the encoder share it measured (30.5%)."""
    from experiments import allocation
    from benchmarks.sizes import part_sizes
    from modeling_nanovlm import NanoVLMConfig

    budget, splits = allocation.allocate(name, 511, allocation.SHARES)
    config = NanoVLMConfig.from_preset(f"{name}-dec", vocab_size=511)
    heavy = part_sizes(config)
    assert abs(heavy["total"] / budget - 1) <= 0.02
    assert heavy["vision"] / heavy["total"] == pytest.approx(0.305, abs=0.01)
    lightest = min(splits, key=lambda s: s["share"])  # the sweep's 30% point is this very config
    assert (config.vision_hidden_size, config.hidden_size) == (lightest["vision_hidden_size"], lightest["hidden_size"])


def test_allocation_step_times_time_every_split_and_the_preset(tmp_path, capsys):
    from experiments import allocation

    out = tmp_path / "alloc.json"
    allocation.main(["--step_times", "true", "--step_rounds", "1", "--shares", "0.3", "0.85", "--num_train_examples", "200",
                     "--output", str(out), "--output_root", str(tmp_path / "runs")])
    report = json.loads((tmp_path / "alloc_step_times.json").read_text())
    shares = [float(r["config"].rstrip("%")) for r in report["rows"][:2]]
    assert abs(shares[0] - 30) < 1 and abs(shares[1] - 85) < 1 and report["rows"][2]["config"] == "mini-112"
    assert report["batch_size"] == 16  # train.py's default batch
    assert all(r["step_seconds"] > 0 for r in report["rows"]) and report["rows"][-1]["over_preset"] == 1.0
    assert not list((tmp_path / "runs" / "recipes").glob("*.json"))  # nothing trained
    assert f"| {report['rows'][0]['config']} | {report['rows'][0]['vision_hidden_size']} / " in capsys.readouterr().out


def test_allocation_splits_one_budget_and_sweeps_resumably(tmp_path, capsys):
    from experiments import allocation

    budget, splits = allocation.allocate("mini-112", 511, allocation.SHARES)
    for split in splits:  # each target share met within a point, each total within 2% of mini-112's
        assert abs(split["share"] - split["target_share"]) < 0.06 and abs(split["total"] / budget - 1) <= 0.02
        assert split["vision"] + split["projector"] + split["decoder"] == split["total"]
    assert [s["vision_hidden_size"] for s in splits] == sorted(s["vision_hidden_size"] for s in splits)

    out = tmp_path / "alloc.json"
    argv = ["--shares", "0.85", "--seeds", "0", "1", "--num_train_examples", "32", "--num_validation_examples", "8",
            "--eval_steps", "1000", "--output", str(out), "--output_root", str(tmp_path / "runs")]
    allocation.main(argv)
    report = json.loads(out.read_text())
    assert len(report["runs"]) == 2 and all(r["returncode"] == 0 for r in report["runs"])
    assert [s["seeds_finished"] for s in report["summary"]] == [2]
    for line in report["summary"]:  # mean and spread over the two seeds of each share
        losses = [r["final.eval_loss"] for r in report["runs"] if f"share{round(line['target_share'] * 100)}-" in r["name"]]
        assert line["final.eval_loss"] == pytest.approx(sum(losses) / 2)
        assert line["final.eval_loss.spread"] == pytest.approx(max(losses) - min(losses))
    assert (tmp_path / "alloc.png").stat().st_size > 0 and f"| {report['summary'][0]['share']:.1%} |" in (tmp_path / "alloc.md").read_text()
    recipe = json.loads((tmp_path / "runs" / "recipes" / "mini-scenes-share85-seed1.json").read_text())
    split = report["summary"][0]
    widths = f"vision_hidden_size={split['vision_hidden_size']},hidden_size={split['hidden_size']}"
    assert recipe["seed"] == 1 and recipe["config_overrides"] == widths
    assert report["vocab_size"] < 511  # the tokenizer of 32 training texts, shared by both runs

    capsys.readouterr()
    allocation.main(argv)  # finished runs are not run again
    assert json.loads(out.read_text())["runs"] == report["runs"]


def test_benchmark_flags_are_settings_fields_and_quick_sets_their_defaults():
    from benchmarks.__main__ import QUICK, parse_args

    args, settings = parse_args(["--quick", "--train_steps", "7", "--presets", "mini", "base", "--bf16_mfu", "false"])
    assert args.quick and settings.train_steps == 7 and settings.presets == ["mini", "base"] and settings.bf16_mfu is False
    assert settings.ttq_seconds == QUICK.ttq_seconds and settings.matmul_sizes == QUICK.matmul_sizes  # the rest: QUICK's
    assert parse_args([])[1] == Settings()
    with pytest.raises(ValueError, match="--trainsteps"):
        parse_args(["--trainsteps", "7"])  # a misspelt setting is refused, not ignored


def test_photos_peer_trains_both_sides_for_the_same_time_and_scores_them(tmp_path):
    from PIL import Image

    from experiments import photos_peer

    images, coco = tmp_path / "images", {"images": [], "annotations": []}
    images.mkdir()
    colours = ["red", "green", "blue", "black"]
    for k in range(12):
        Image.new("RGB", (32, 32), [(200, 30, 30), (30, 200, 30), (30, 30, 200), (10, 10, 10)][k % 4]).save(images / f"{k}.png")
        coco["images"].append({"id": k, "file_name": f"{k}.png"})
        for j in range(2):
            coco["annotations"].append({"image_id": k, "id": 10 * k + j, "caption": f"a {colours[k % 4]} square on a wall ."})
    (tmp_path / "captions.json").write_text(json.dumps(coco))
    recipe = {"preset": "mini", "vision_feature_select": "pooled", "image_size": 32, "vocab_size": 300,
              "config_overrides": "hidden_size=32,num_hidden_layers=2,num_attention_heads=4,vision_hidden_size=32,"
                                  "vision_num_attention_heads=4,patch_size=8,vision_stem_channels=16,vision_pool_size=2,max_position_embeddings=64",
              "dataset": "coco", "caption_file": str(tmp_path / "captions.json"), "image_dir": str(images),
              "validation_caption_file": str(tmp_path / "captions.json"), "num_validation_examples": 4,
              "aux_words_weight": 1.0, "aux_words_min_count": 1, "augment": True, "learning_rate": 0.003,
              "per_device_train_batch_size": 4, "use_cpu": True}
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    out = tmp_path / "peer.json"
    photos_peer.main(["--recipe", str(tmp_path / "recipe.json"), "--budget_minutes", "0.05", "--output", str(out)])
    report = json.loads(out.read_text())
    nano, peer = report["sides"]["nanovlm"], report["sides"]["peer"]
    assert report["validation_photos"] == 4 and set(report["schedule_steps"]) == {"nanovlm", "peer"}
    for name, side in report["sides"].items():  # each trained its schedule within the budget (3 s) and was scored on the 4 photos
        assert 1 <= side["steps"] <= report["schedule_steps"][name] and side["train_seconds"] <= 3 + 10
        assert len(side["samples_captions"]) == 4
        assert 0 <= side["cider_d"] and 0 <= side["bleu4"] <= 1
    assert nano["parameters"] != peer["parameters"] and "| nanovlm |" in (tmp_path / "peer.md").read_text()


def test_revisions_times_a_git_revision_and_this_checkout_each_in_its_own_code(tmp_path, capsys):
    """`python -m benchmarks.revisions --baseline HEAD`: the committed tree (git archive) and the working tree
    take turns, each process importing its own tree's model code; the report has both sides' figures."""
    from benchmarks import revisions

    output = tmp_path / "revisions.json"
    revisions.main(["--baseline", "HEAD", "--output", str(output), "--repeats", "1", "--batch_size", "4", "--train_steps", "1",
                    "--train_seconds", "0", "--warmup_steps", "1", "--lengths", "3", "--generate_batch_sizes", "1", "4",
                    "--generate_calls", "1", "1", "--tokenizer_texts", "200", "--threads", "1"])
    report = json.loads(output.read_text())
    assert report["baseline"] == "HEAD" and len(report["rounds"]["baseline"]) == len(report["rounds"]["current"]) == 1
    assert "/baseline/modeling_nanovlm/" in report["rounds"]["baseline"][0]["code"]
    assert report["rounds"]["current"][0]["code"].startswith(revisions.ROOT)
    expected = {"train_samples_per_s"} | {f"generate_{side}_batch_{b}_tokens_3_captions_per_s" for side in ("nanovlm", "peer") for b in (1, 4)}
    assert set(report["summary"]) == expected
    for row in report["summary"].values():
        assert row["baseline"] > 0 and row["current"] > 0 and row["noise"] == 1.0  # one round a side: no spread
        assert row["current_over_baseline"] == pytest.approx(row["current"] / row["baseline"])
    assert "train_samples_per_s: baseline" in capsys.readouterr().out


def test_progress_lines_up_runs_by_step_and_says_when_a_run_has_no_evaluations(tmp_path, capsys):
    from experiments import progress

    for name, rows in {"a": [(1000, 0.1), (2000, 0.2), (2000, 0.25)], "b": [(1000, 0.3)]}.items():  # a resumed run logs 2000 twice
        (tmp_path / name).mkdir()
        (tmp_path / name / "samples.jsonl").write_text("".join(
            json.dumps({"step": step, "captions": ["x"], "eval_cider_d": value, "eval_image_gap": value / 2}) + "\n"
            for step, value in rows))
    out = tmp_path / "progress.json"
    progress.main([str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(out), "--step_cost", "1", "1.3"])
    report = json.loads(out.read_text())
    assert report["metrics"] == ["eval_cider_d", "eval_image_gap"]
    assert report["steps"] == [{"step": 1000, "a.eval_cider_d": 0.1, "b.eval_cider_d": 0.3, "a.eval_image_gap": 0.05, "b.eval_image_gap": 0.15},
                               {"step": 2000, "a.eval_cider_d": 0.25, "b.eval_cider_d": None, "a.eval_image_gap": 0.125, "b.eval_image_gap": None}]
    assert "| 2000 | 0.250 |  | 0.125 |  |" in capsys.readouterr().out
    assert (tmp_path / "progress.png").stat().st_size > 0
    with pytest.raises(FileNotFoundError, match="samples.jsonl does not exist"):
        progress.main([str(tmp_path), "--output", str(out)])

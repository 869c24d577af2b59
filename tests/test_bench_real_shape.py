"""bench/real_shape_rehearsal.py --quick end to end (SD-2's structure at tiny widths): every phase runs through the
project's code, its FLOPs are counted, agree with the meta-device count, and the paper-scale arithmetic holds."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import sd2_shape  # noqa: E402
from text_feature_cost import counted_flops  # noqa: E402

PHASES = ("grounding", "fid update", "train frozen", "train learnable")
PAPER_ROWS = (
    "train frozen",
    "train learnable",
    "train frozen, gradient checkpointing on",
    "train frozen, cached latents",
    "grounding",
    "fid generation",
)
GPU_PEAKS = (312e12, 989e12)


def table_rows(text: str, heading: str) -> dict[str, list[str]]:
    """Cells of the markdown table under the line starting with ``heading``, keyed by the first cell."""
    section = text.split(heading, 1)[1].split("\n\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in rows[1:]}


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory) -> str:
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "real_shape_rehearsal.py"), "--quick", "--threads", "1"],
        cwd=tmp_path_factory.mktemp("rehearsal"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_every_phase_runs_and_its_flops_match_the_meta_device_count(quick_report):
    assert "model: SD-2 structure, tiny widths" in quick_report
    rows = table_rows(quick_report, "## Rehearsal:")
    assert tuple(rows) == PHASES
    for name, (_work, seconds, peak_gib, counted, meta, rate) in rows.items():
        assert float(seconds) > 0 and float(peak_gib) > 0, name
        assert float(counted) > 0, name
        # Counted during the real bf16 run on the CPU == the same calls on the meta device (0.1 GFLOP rounding).
        assert float(counted) == pytest.approx(float(meta), abs=0.1), name
        # GFLOP/s from the unrounded values: off by the 0.05 s rounding of the printed seconds at most.
        assert float(rate) == pytest.approx(float(counted) / float(seconds), rel=0.06 / float(seconds), abs=0.1), name
    assert "N=50, K=40" in rows["grounding"][0]
    # Training the text encoder adds its backward (and the text forward with gradients) to the frozen step.
    assert float(rows["train learnable"][3]) > float(rows["train frozen"][3])
    assert "AdamW + EMA" in rows["train frozen"][0]  # tiny: the full training state fits


def test_paper_scale_hours_follow_from_the_flops(quick_report):
    heading = next(line for line in quick_report.splitlines() if line.startswith("## Paper scale:"))
    assert "512 px" in heading and "40% MFU" in heading
    assert "(40% x bf16 dense peak: A100 312 TFLOP/s, H100 SXM 989 TFLOP/s)" in quick_report
    rows = table_rows(quick_report, "## Paper scale:")
    assert tuple(rows) == PAPER_ROWS
    expected_units = dict.fromkeys(PAPER_ROWS[:4], 480_000) | {"grounding": 1_162, "fid generation": 5_000}
    for name, (units, per_unit_gflop, total_pflop, *hours) in rows.items():
        count = int(units.split()[0])
        assert count == expected_units[name]
        total = count * float(per_unit_gflop) * 1e9
        assert float(total_pflop) == pytest.approx(total / 1e15, rel=0.01, abs=0.06)
        for peak, value in zip(GPU_PEAKS, hours, strict=True):
            assert float(value) == pytest.approx(total / (peak * 0.4) / 3600, rel=0.01, abs=0.006)
    assert float(rows["train learnable"][1]) > float(rows["train frozen"][1])
    # Checkpointing recomputes the UNet's forward in the backward pass: between +0 and +50 % of a step.
    checkpointed, plain = float(rows["train frozen, gradient checkpointing on"][1]), float(rows["train frozen"][1])
    assert plain < checkpointed < 1.5 * plain
    assert float(rows["train frozen, cached latents"][1]) < plain  # no VAE encoder
    # A FID image runs 75 guided steps (2 UNet calls each), a grounding pair 40 unguided ones.
    assert float(rows["fid generation"][1]) > 3 * float(rows["grounding"][1])


def test_cpu_attention_is_counted_like_the_meta_device_does():
    """torch's counter misses the CPU attention kernel: without our mapping the real run would count less."""
    shape = sd2_shape.TINY
    config = shape.unet_config(latent_size=8)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config)
    with torch.device("meta"):
        meta_unet = UNet2DConditionModel(**config)

    def forward(model: UNet2DConditionModel, device: str) -> None:
        latents = torch.zeros(1, 4, 8, 8, device=device)
        text = torch.zeros(1, sd2_shape.TOKENS, 1024, device=device)
        model(latents, torch.zeros(1, dtype=torch.long, device=device), text).sample.sum().backward()

    _, cpu_flops = counted_flops(lambda: forward(unet, "cpu"))
    _, meta_flops = counted_flops(lambda: forward(meta_unet, "meta"))
    assert cpu_flops == meta_flops > 0
    with torch.utils.flop_counter.FlopCounterMode(display=False) as plain:
        forward(unet, "cpu")
    assert plain.get_total_flops() < cpu_flops


def test_published_sd2_shape():
    """SD-2 base's published parameter counts: UNet 865.9 M, text encoder 340.4 M, VAE 83.7 M."""
    with torch.device("meta"):
        parts = sd2_shape.build_parts(sd2_shape.SD2, 512)
    assert sd2_shape.parameter_count(parts.denoiser) == 865_910_724
    assert sd2_shape.parameter_count(parts.text_encoder) == 340_387_840
    assert sd2_shape.parameter_count(parts.vae) == 83_653_863
    assert tuple(parts.denoiser.config.attention_head_dim) == (5, 10, 20, 20)  # heads per block, 64 channels each
    assert parts.denoiser.config.sample_size == 64
    assert [m.heads for m in parts.denoiser.modules() if type(m).__name__ == "Attention"][:2] == [5, 5]


def test_training_state_drops_ema_then_the_optimizer_when_memory_is_short():
    from real_shape_rehearsal import training_state

    total, trained = 1_000_000_000, 500_000_000
    base = 6 * total + 4 * trained + 2**30  # weights, bf16 copies, gradients, 1 GiB of activations
    assert training_state(total, trained, base + 12 * trained) == ("AdamW + EMA", base + 12 * trained)
    assert training_state(total, trained, base + 12 * trained - 1) == ("AdamW, no EMA", base + 8 * trained)
    assert training_state(total, trained, base + 8 * trained - 1)[0].startswith("gradients only")
    assert training_state(total, trained, 0) == ("gradients only (no optimizer, no EMA)", base)

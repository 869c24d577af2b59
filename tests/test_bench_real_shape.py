"""bench/real_shape_rehearsal.py --quick end to end, for each backbone (SD-2's and PixArt-Σ's structure at tiny
widths): every phase runs through the project's code, its FLOPs are counted, agree with the meta-device count, and the
paper-scale arithmetic holds; PixArt-Σ with its text encoder stored in bf16, as the full run keeps T5-XXL, trains the
frozen variant alone on a bf16 encoder."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import pixart_shape  # noqa: E402
import real_shape_rehearsal  # noqa: E402
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
TINY_NAMES = {"unet": "SD-2 structure, tiny widths", "pixart": "PixArt-Σ structure, tiny widths"}


def table_rows(text: str, heading: str) -> dict[str, list[str]]:
    """Cells of the markdown table under the line starting with ``heading``, keyed by the first cell."""
    section = text.split(heading, 1)[1].split("\n\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in rows[1:]}


def quick_run(directory: Path, *options: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "real_shape_rehearsal.py"), "--quick", "--threads", "1", *options],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module", params=sorted(TINY_NAMES))
def quick_report(request, tmp_path_factory) -> tuple[str, str]:
    """(backbone, the quick run's report)."""
    return request.param, quick_run(tmp_path_factory.mktemp("rehearsal"), "--backbone", request.param).stdout


def assert_phases_counted_like_meta(rows: dict[str, list[str]]) -> None:
    for name, (_work, seconds, peak_gib, counted, meta, rate) in rows.items():
        assert float(seconds) > 0 and float(peak_gib) > 0, name
        assert float(counted) > 0, name
        # Counted during the real bf16 run on the CPU == the same calls on the meta device (0.1 GFLOP rounding).
        assert float(counted) == pytest.approx(float(meta), abs=0.1), name
        # GFLOP/s from the unrounded values: within what the printed GFLOP, seconds and rate (each to 0.1) allow.
        counted, seconds = float(counted), float(seconds)
        assert (
            (counted - 0.05) / (seconds + 0.05) - 0.05 <= float(rate) <= (counted + 0.05) / (seconds - 0.05) + 0.05
        ), name


def test_every_phase_runs_and_its_flops_match_the_meta_device_count(quick_report):
    backbone, report = quick_report
    assert f"model: {TINY_NAMES[backbone]}" in report and "text encoder weights float32" in report
    rows = table_rows(report, "## Rehearsal:")
    assert tuple(rows) == PHASES
    assert_phases_counted_like_meta(rows)
    assert "N=50, K=40" in rows["grounding"][0]
    assert {"unet": "DDIM steps", "pixart": "DPMSolverMultistep steps"}[backbone] in rows["fid update"][0]
    # Training the text encoder adds its backward (and the text forward with gradients) to the frozen step.
    assert float(rows["train learnable"][3]) > float(rows["train frozen"][3])
    assert "AdamW + EMA" in rows["train frozen"][0]  # tiny: the full training state fits


def test_paper_scale_hours_follow_from_the_flops(quick_report):
    _, quick_report = quick_report
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

    weights, trained = 6_000_000_000, 500_000_000
    base = weights + 4 * trained + 2**30  # weights (with bf16 copies), gradients, 1 GiB of activations
    assert training_state(weights, trained, base + 12 * trained) == ("AdamW + EMA", base + 12 * trained)
    assert training_state(weights, trained, base + 12 * trained - 1) == ("AdamW, no EMA", base + 8 * trained)
    assert training_state(weights, trained, base + 8 * trained - 1)[0].startswith("gradients only")
    assert training_state(weights, trained, 0) == ("gradients only (no optimizer, no EMA)", base)


def test_resident_weights_count_autocast_copies_of_fp32_weights_only():
    module = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 10).to(torch.bfloat16))
    # fp32: 4 B + a 2 B bf16 copy under autocast; bf16: its 2 B, used as is.
    assert real_shape_rehearsal.resident_weight_bytes(module) == 110 * 6 + 110 * 2


def test_pixart_real_shape_is_built_with_t5_xxl_in_bf16_and_counted_in_fp32():
    """The full PixArt run's model: T5-XXL built (never in fp32) and saved in bf16, FLOPs counted on an fp32 meta
    module (the same FLOPs); an SD-2 run refuses a bf16 text encoder."""
    args = real_shape_rehearsal.parse_args(["--backbone", "pixart"])
    assert args.text_encoder_weights == "bf16" and args.resolution == 256
    model = args.model
    with torch.device("meta"):
        parts = model.build_parts(512)
    assert {p.dtype for p in parts.text_encoder.parameters()} == {torch.bfloat16}
    for part in (parts.denoiser, parts.vae):
        assert {p.dtype for p in part.parameters()} == {torch.float32}
    assert sd2_shape.parameter_count(parts.text_encoder) == pixart_shape.PUBLISHED_PARAMETERS["text_encoder"]
    meta = model.meta_module(512, "frozen", checkpointing=False)
    assert {p.dtype for p in meta.text_encoder.parameters()} == {torch.float32}
    assert real_shape_rehearsal.parse_args(["--backbone", "pixart", "--quick"]).text_encoder_weights == "fp32"
    with pytest.raises(SystemExit):
        real_shape_rehearsal.parse_args(["--text-encoder-weights", "bf16"])


def test_pixart_with_a_bf16_text_encoder_trains_the_frozen_variant_alone(tmp_path):
    result = quick_run(tmp_path, "--backbone", "pixart", "--text-encoder-weights", "bf16")
    assert f"model: {TINY_NAMES['pixart']}" in result.stdout and "text encoder weights bfloat16" in result.stdout
    rows = table_rows(result.stdout, "## Rehearsal:")
    assert tuple(rows) == ("grounding", "fid update", "train frozen")
    assert_phases_counted_like_meta(rows)
    assert "trains transformer;" in rows["train frozen"][0]
    assert "[skip] learnable variant: the text encoder's weights are bf16" in result.stderr

"""bench/gpu_rehearsal.py on the CPU: every phase stays on the requested device although Lightning's teardown moves
the module away after every fit (simulated here: on a CPU its move to the CPU changes nothing), a module that left
the device stops the run naming the parameter, and the quick run's report (--quick, tiny widths of the SD-2
structure) has consistent arithmetic: end-to-end and step-only rates, model and hardware FLOPs, MFU and HFU. The
PixArt-Σ quick run goes through the same phases with its own sampler, latent scale and budgets, without SD-2's
anchor."""

import re
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import gpu_rehearsal  # noqa: E402
import sd2_shape  # noqa: E402

from lightning_modules.latent_diffusion import LatentDiffusionModule  # noqa: E402

NUMBER = r"([0-9]+\.[0-9]+)"
CPU = torch.device("cpu")


def leave_for_meta(module: torch.nn.Module) -> torch.nn.Module:
    """What Lightning's teardown does on a GPU (``module.cpu()``: off the requested device), made visible on a CPU
    machine: the module goes to the meta device instead."""
    return module.to("meta")


class OneLayer(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters())

    cpu = leave_for_meta


def fit_one_step(module: L.LightningModule, strategy) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        strategy=strategy,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(torch.ones(4, 2), batch_size=4))
    return trainer


def test_lightning_teardown_moves_the_module_away_and_keep_on_device_leaves_it():
    moved = OneLayer()
    fit_one_step(moved, "auto")
    assert moved.layer.weight.device.type == "meta"  # Lightning's teardown called module.cpu(): the simulation is live

    kept = OneLayer()
    trainer = fit_one_step(kept, gpu_rehearsal.KeepOnDevice(CPU))
    assert {parameter.device for parameter in kept.parameters()} == {CPU}
    assert trainer.optimizers == []  # AdamW's state is dropped, not copied to the CPU
    gpu_rehearsal.assert_on_device(kept, CPU, "after fit")


def test_a_module_off_the_requested_device_stops_the_phase_naming_the_parameter():
    module = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    gpu_rehearsal.assert_on_device(module, CPU, "start of grounding")  # all on the CPU: passes
    module[1].running_mean = module[1].running_mean.to("meta")  # a buffer
    with pytest.raises(gpu_rehearsal.WrongDevice, match=r"start of FID: Sequential\.1\.running_mean is on meta"):
        gpu_rehearsal.assert_on_device(module, CPU, "start of FID")

    module = torch.nn.Sequential(torch.nn.Linear(2, 2))

    def phase_that_moves_a_parameter() -> str:
        module[0].weight = torch.nn.Parameter(torch.zeros(2, 2, device="meta"))
        return "done"

    with pytest.raises(gpu_rehearsal.WrongDevice, match=r"end of grounding: Sequential\.0\.weight is on meta, not on"):
        gpu_rehearsal.on_device("grounding", CPU, [module], phase_that_moves_a_parameter)


def test_quick_run_keeps_every_phase_on_the_requested_device_and_reports_consistent_numbers(
    tmp_path, monkeypatch, capsys
):
    # On a GPU, Lightning's teardown moves the module to the CPU after every fit (out of memory included): here it
    # moves it to meta, and the batch search's batch 4 runs out of memory.
    monkeypatch.setattr(LatentDiffusionModule, "cpu", leave_for_meta)
    training_step = LatentDiffusionModule.training_step

    def out_of_memory_from_batch_4(self, batch, batch_idx):
        if len(batch["caption"]) >= 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(LatentDiffusionModule, "training_step", out_of_memory_from_batch_4)
    checks = []
    assert_on_device = gpu_rehearsal.assert_on_device

    def recorded(module, device, where):
        checks.append((where, {tensor.device for tensor in [*module.parameters(), *module.buffers()]}))
        assert_on_device(module, device, where)

    monkeypatch.setattr(gpu_rehearsal, "assert_on_device", recorded)
    monkeypatch.chdir(tmp_path)
    gpu_rehearsal.main(
        ["--quick", "--device", "cpu", "--max-batch-size", "8", "--gradient-checkpointing", "--peak-tflops", "0.05"]
    )
    out = capsys.readouterr().out

    phases = [f"batch {size}" for size in (1, 2, 4)] + ["grounding"]
    expected = [f"{edge} of {phase}" for phase in phases for edge in ("start", "end")]
    expected += ["start of FID"] * 2 + ["end of FID"] * 2  # the module and the feature extractor
    assert [where for where, _ in checks] == expected
    assert all(devices == {CPU} for _, devices in checks), checks
    assert "cached latents" in out and "bf16-mixed" in out and "device: CPU" in out and "every phase on cpu" in out

    rows = re.findall(rf"^\| (\d+) \| {NUMBER} \| {NUMBER} \| {NUMBER} \| {NUMBER} \| {NUMBER} \| ", out, re.M)
    assert [int(row[0]) for row in rows] == [1, 2]
    assert re.search(r"^\| 4 \| out of memory \| - \| [0-9.]+ \| - \| - \| - \| - \|$", out, re.M)
    assert "largest batch that fits: 2 " in out and "search stopped: out of memory" in out
    best = re.search(
        rf"best training throughput: {NUMBER} images/s end to end per device at batch (\d) \({NUMBER} step only\); "
        rf"{NUMBER} GFLOP per image model, {NUMBER} hardware",
        out,
    )
    end_to_end = {int(batch): float(rate) for batch, rate, *_ in rows}
    assert float(best.group(1)) == pytest.approx(max(end_to_end.values()), abs=0.001)
    assert end_to_end[int(best.group(2))] == pytest.approx(float(best.group(1)), abs=0.001)
    model_gflop, hardware_gflop = float(best.group(4)), float(best.group(5))
    assert hardware_gflop > model_gflop > 0  # gradient checkpointing recomputes the forward
    for _, rate, step_rate, peak_gib, model_tflops, hardware_tflops in rows:
        assert 0 < float(rate) <= float(step_rate)  # the end-to-end window holds the steps and more
        assert float(peak_gib) > 0
        assert float(model_tflops) == pytest.approx(float(rate) * model_gflop / 1000, abs=2e-4)
        assert float(hardware_tflops) == pytest.approx(float(rate) * hardware_gflop / 1000, abs=2e-4)
    utilisation = re.search(
        rf"against the dense bf16 peak of --peak-tflops \(0.05 TFLOP/s\): MFU {NUMBER}% \(model FLOPs, no "
        rf"recomputation\), HFU {NUMBER}% \(hardware FLOPs, recomputation included\)",
        out,
    )
    rate = float(best.group(1))
    # Percentages are printed to 0.01 (a slow machine's MFU is well under 1 %, where that rounding exceeds 1 %).
    assert float(utilisation.group(1)) == pytest.approx(100 * rate * model_gflop / 50, rel=0.01, abs=0.006)
    assert float(utilisation.group(2)) == pytest.approx(100 * rate * hardware_gflop / 50, rel=0.01, abs=0.006)

    grounding = re.search(rf"grounding: {NUMBER} s per pair \(2 pairs in one batch, N=50, K=40", out)
    fid = re.search(rf"FID: {NUMBER} images/s \(2 images, 2 DDIM steps, guidance 4", out)
    assert grounding and float(grounding.group(1)) > 0
    assert fid and float(fid.group(1)) > 0
    anchor = re.search(rf"36 images/s per A100; ours \(end to end\) / anchor = {NUMBER}", out)
    goal = re.search(rf">= 100 images/s per H100/H200; ours \(end to end\) / goal = {NUMBER}", out)
    assert float(anchor.group(1)) == pytest.approx(rate / 36, abs=0.001)
    assert float(goal.group(1)) == pytest.approx(rate / 100, abs=0.001)
    times = dict(re.findall(rf"^\| ([A-Za-z -]+) \| {NUMBER} \| ", out, re.M))
    assert list(times) == ["set-up", "FLOP count", "batch search", "grounding", "FID", "total"]
    rounding = 0.05 * len(times)  # each time is printed to 0.1 s
    assert float(times["total"]) == pytest.approx(sum(float(times[name]) for name in list(times)[:-1]), abs=rounding)
    assert list(tmp_path.iterdir()) == []  # the model folder lived in a temporary directory


def result(batch_size: int, seconds: float = 1.0, fits: bool = True) -> gpu_rehearsal.BatchResult:
    rate = 10.0 * batch_size if fits else None
    return gpu_rehearsal.BatchResult(batch_size, rate, rate, peak_bytes=batch_size, seconds=seconds)


def test_batch_search_doubles_until_out_of_memory_the_largest_batch_or_the_time_budget():
    tried = []

    def measure(batch_size: int) -> gpu_rehearsal.BatchResult:
        tried.append(batch_size)
        return result(batch_size, seconds=batch_size, fits=batch_size < 8)

    results, stop = gpu_rehearsal.doubling_batch_sizes(measure, max_batch_size=1024, budget_s=1000)
    assert tried == [1, 2, 4, 8] and stop == "out of memory"
    assert [r.end_to_end_images_per_second for r in results] == [10.0, 20.0, 40.0, None]
    results, stop = gpu_rehearsal.doubling_batch_sizes(measure, max_batch_size=3, budget_s=1000)
    assert [r.batch_size for r in results] == [1, 2] and stop == "--max-batch-size 3 reached, no OOM"
    # 1 + 2 s spent; batch 4 forecast at 2 x 2 s would end at 7 s, past a 6 s budget.
    results, stop = gpu_rehearsal.doubling_batch_sizes(measure, max_batch_size=1024, budget_s=6)
    assert [r.batch_size for r in results] == [1, 2] and stop == "batch 4 would end past the 6 s search budget"


def test_out_of_memory_is_recognised_and_other_errors_are_not():
    assert gpu_rehearsal.out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert gpu_rehearsal.out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not gpu_rehearsal.out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


@pytest.mark.parametrize(
    ("name", "row"),
    [
        ("NVIDIA H100 80GB HBM3", ("H100 SXM", 989e12)),
        ("NVIDIA H100 PCIe", ("H100 PCIe", 756e12)),
        ("NVIDIA H200", ("H200", 989e12)),
        ("NVIDIA A100-SXM4-80GB", ("A100", 312e12)),
        ("NVIDIA A100 80GB PCIe", ("A100", 312e12)),
        ("NVIDIA H100 NVL", None),
        ("NVIDIA L4", None),
    ],
)
def test_dense_bf16_peak_by_device_name(name, row):
    assert sd2_shape.bf16_dense_peak(name) == row


def test_pixart_quick_run_reports_its_own_sampler_and_budgets_without_the_sd2_anchor(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    gpu_rehearsal.main(
        ["--backbone", "pixart", "--quick", "--device", "cpu", "--max-batch-size", "2", "--peak-tflops", "0.05"]
    )
    out = capsys.readouterr().out
    assert "model: PixArt-Σ structure, tiny widths, random weights, variant frozen (trains transformer)" in out
    assert "text encoder weights float32" in out and "every phase on cpu" in out
    rows = re.findall(rf"^\| (\d+) \| {NUMBER} \| {NUMBER} \| {NUMBER} \| ", out, re.M)
    assert [int(row[0]) for row in rows] == [1, 2] and all(float(row[1]) > 0 for row in rows)
    assert "search stopped: --max-batch-size 2 reached, no OOM" in out
    assert re.search(r"grounding: [0-9.]+ s per pair \(2 pairs in one batch, N=50, K=40", out)
    assert re.search(r"FID: [0-9.]+ images/s \(2 images, 2 DPMSolverMultistep steps, guidance 4", out)
    assert "anchor: none (no published PixArt-Σ fine-tuning throughput); goal: none set" in out
    assert "MosaicML" not in out
    assert re.search(r"^\| total \| [0-9.]+ \| 540 \(imports included\) \|$", out, re.M)  # PixArt-Σ's budget
    assert list(tmp_path.iterdir()) == []


def test_cached_latents_have_unit_variance_at_the_vae_scale():
    """PixArt-Σ's SDXL VAE scales latents by 0.13025, SD's by 0.18215: the cached means are drawn for the VAE used."""
    for scale in (0.13025, 0.18215):
        (batch,) = gpu_rehearsal.cached_latent_loader(1, 4, 64, scale)
        mean = batch["latent_moments"][:, :4]
        assert (mean * scale).std().item() == pytest.approx(1.0, abs=0.1)


def test_a_bf16_text_encoder_is_for_a_frozen_pixart_encoder_only():
    assert gpu_rehearsal.parse_args(
        ["--backbone", "pixart", "--text-encoder-weights", "bf16"]
    ).model.text_encoder_dtype == (torch.bfloat16)
    for refused in (
        ["--text-encoder-weights", "bf16"],
        ["--backbone", "pixart", "--text-encoder-weights", "bf16", "--variant", "learnable"],
    ):
        with pytest.raises(SystemExit):
            gpu_rehearsal.parse_args(refused)

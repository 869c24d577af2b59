"""Fine-tune a latent diffusion model on chest X-rays and their reports.

    python train.py                                         # embedded default: synthetic MIMIC-format data, CPU
    python train.py --config configs/experiment/learnable_text_encoder.yaml   # the paper's other variant
    python train.py stage=autoencoder                       # only train (and cache) the VAE on the images
    python train.py --config configs/experiment/stable_diffusion_2_base.yaml --config configs/data/mimic_cxr.yaml \
        model.pretrained=/models/stable-diffusion-2-base data.root=/data/mimic-cxr-jpg/2.1.0 \
        data.reports_root=/data/mimic-cxr-reports.zip trainer.devices=4 trainer.strategy=ddp

Configs merge default.yaml ← each --config file ← key=value overrides (unknown keys are errors). The stages:
1. data: the embedded synthetic set is generated from its seed on first use (data.root=null);
2. autoencoder (when model.vae.pretrained=auto): a VAE is trained on the images, cached by data fingerprint;
3. diffusion: the model is fine-tuned with the configured trainable parts, sampled and exported.
"""

from __future__ import annotations

import os

import configs.process_defaults  # on import, before torch loads: OpenMP waiting, known noise filtered

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers/diffusers are imported: never reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import itertools
import json
import logging
import pickle
import shutil
import time
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from callbacks.attention_heatmaps import AttentionHeatmapCallback
from callbacks.data_report import DATA_REPORT_FILE, DataReportCallback, describe_data_report
from callbacks.export_pipeline import ExportPipelineCallback
from callbacks.fidelity import FIDCallback
from callbacks.grounding import GroundingCallback
from callbacks.last_checkpoint import LastCheckpoint
from callbacks.parts_summary import PartsSummary
from callbacks.reconstruction_grid import ReconstructionGridCallback
from callbacks.sample_grid import SampleGridCallback
from callbacks.slurm_requeue import SlurmRequeue
from callbacks.time_report import describe_time, stage_profiler
from callbacks.tradeoff_panel import TradeoffPanelCallback
from configs import ConfigError, load_config
from datamodules.cxr_datamodule import CxrDataModule, dataset_fingerprint, resolve_data_root
from datamodules.shards import check_cached_latents, read_split_metadata, split_index_location
from lightning_modules.autoencoder import AutoencoderModule, vae_cache_folder
from lightning_modules.components import build_vae, vae_fingerprint
from lightning_modules.latent_diffusion import LatentDiffusionModule

log = logging.getLogger("cxr_diffusion")
report_line = rank_zero_only(print)  # one process speaks for the run


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", default=[], help="a YAML file merged over the defaults")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.max_steps=100")
    return parser.parse_args(argv)


RUN_NAME_VARIABLE = "CXR_DIFFUSION_RUN_NAME"


def make_run_dir(cfg: DictConfig) -> Path:
    """The run folder: the resumed checkpoint's, or a new one that every process of the run agrees on.

    Processes that Lightning spawns inherit the name through an environment variable; processes started by SLURM
    share the job id, so a requeued job finds its folder (and the last.ckpt in it) again.
    """
    if cfg.resume == "last":
        return run_to_continue(Path(cfg.run_dir))
    if cfg.resume:
        checkpoint = Path(cfg.resume)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"resume: checkpoint '{checkpoint}' does not exist")
        return checkpoint.parent.parent
    name = os.environ.get(RUN_NAME_VARIABLE)
    if name is None:
        job = os.environ.get("SLURM_JOB_ID")
        name = f"slurm-{job}" if job else datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        os.environ[RUN_NAME_VARIABLE] = name
    run_dir = Path(cfg.run_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def run_to_continue(run_root: Path) -> Path:
    """resume=last: the run folder started or resumed most recently (each start writes its config.yaml), and only
    that one. If it has no checkpoints/last.ckpt, an error names it and the runs that have one: continuing an older
    run instead would silently cross into another run. A process Lightning spawned takes process 0's choice."""
    name = os.environ.get(RUN_NAME_VARIABLE)
    if name is not None:
        return run_root / name
    runs = [config.parent for config in sorted(run_root.glob("*/config.yaml"), key=lambda path: path.stat().st_mtime)]
    if not runs:
        raise FileNotFoundError(f"resume=last: no run folder (one with a config.yaml) under {run_root}/")
    newest = runs[-1]
    if not (newest / "checkpoints" / "last.ckpt").is_file():
        with_last = [str(run / "checkpoints" / "last.ckpt") for run in reversed(runs) if run != newest]
        with_last = [path for path in with_last if Path(path).is_file()]
        step_files = sorted(path.name for path in (newest / "checkpoints").glob("step*.ckpt"))
        raise FileNotFoundError(
            f"resume=last: the newest run, {newest} (started or resumed last, by its config.yaml), has no "
            f"checkpoints/last.ckpt: it stopped before its first checkpoint"
            + (f" (its step checkpoints: {', '.join(step_files)})" if step_files else "")
            + ". resume=last continues only the newest run; "
            + (f"runs with a last.ckpt, newest first: {', '.join(with_last)}. " if with_last else "")
            + "Pass resume=<checkpoint path> to continue one of them, or leave resume unset to start afresh."
        )
    os.environ[RUN_NAME_VARIABLE] = newest.name  # the processes Lightning spawns continue the same run
    report_line(f"[resume] resume=last: continuing the newest run, {newest}")
    return newest


def requeued_slurm_job(run_dir: Path) -> bool:
    """Whether this is a SLURM job started again by `scontrol requeue` (see callbacks/slurm_requeue.py) in its
    own run folder."""
    job = os.environ.get("SLURM_JOB_ID")
    return job is not None and run_dir.name == f"slurm-{job}" and os.environ.get("SLURM_RESTART_COUNT", "0") != "0"


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    """The checkpoint to resume: resume=last or resume=<path>, or a requeued SLURM job's own last.ckpt."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if cfg.resume:
        return str(last) if cfg.resume == "last" else str(cfg.resume)
    if requeued_slurm_job(run_dir) and last.is_file():
        report_line(f"[resume] requeued SLURM job: continuing from {last}")
        return str(last)
    return None


def build_datamodule(
    cfg: DictConfig, root: Path, batch_size: int, tokenizer=None, read_latents: bool = False
) -> CxrDataModule:
    return CxrDataModule(
        root,
        cfg.data.resolution,
        reports_root=cfg.data.reports_root,
        views=list(cfg.data.views),
        caption_section=cfg.data.caption_section,
        train_split=cfg.data.splits.train,
        val_split=cfg.data.splits.val,
        batch_size=batch_size,
        num_workers=cfg.data.num_workers,
        tokenizer=tokenizer,
        seed=cfg.seed,
        data_format=cfg.data.format,
        shards=cfg.data.shards,
        shard_cache_dir=Path(cfg.data.cache_dir) / "shards",
        shuffle_window=cfg.data.shuffle_window,
        read_latents=read_latents,
    )


def uses_cached_latents(cfg: DictConfig, module: LatentDiffusionModule) -> bool:
    """Whether the diffusion stage samples the shards' stored posteriors instead of running the VAE encoder.

    Yes when the shards hold latents and data.use_cached_latents is on; stale latents (a trainable VAE, or
    latents another VAE made) are refused rather than silently trained on.
    """
    if cfg.data.format != "shards" or not cfg.data.use_cached_latents:
        return False
    latents = read_split_metadata(cfg.data.shards, cfg.data.splits.train)["latents"]
    if latents is None:
        return False
    location = split_index_location(cfg.data.shards, cfg.data.splits.train)
    check_cached_latents(latents, location, vae_fingerprint(module.vae), "vae" in module.trainable)
    return True


def wandb_run_id(run_dir: Path, job: str) -> str | None:
    """The W&B run id of this run folder and job, created once and kept beside the checkpoints."""
    id_file = run_dir / f"wandb-{job}.id"
    if not id_file.is_file() and rank_zero_only.rank == 0:  # other ranks log nothing to W&B
        id_file.write_text(uuid.uuid4().hex[:12])
    return id_file.read_text().strip() if id_file.is_file() else None


def build_loggers(cfg: DictConfig, run_dir: Path, job: str) -> list[Logger]:
    loggers: list[Logger] = []
    if cfg.logger.csv:
        loggers.append(CSVLogger(save_dir=run_dir, name=job, version=""))
    if cfg.logger.tensorboard:
        loggers.append(TensorBoardLogger(save_dir=run_dir, name="tensorboard", version=job, default_hp_metric=False))
    wandb_cfg = cfg.logger.wandb
    if wandb_cfg.enabled and wandb_cfg.mode != "disabled":
        wandb_logger = WandbLogger(
            save_dir=str(run_dir),
            project=wandb_cfg.project,
            entity=wandb_cfg.entity,
            group=wandb_cfg.group,
            name=f"{cfg.name}/{run_dir.name}/{job}",
            tags=list(wandb_cfg.tags),
            job_type=job,
            mode=wandb_cfg.mode,
            id=wandb_run_id(run_dir, job),
            resume="allow",  # a resumed run continues the same W&B run and its curves
            log_model=wandb_cfg.log_model,
        )
        # Lightning always passes wandb.init(anonymous=None), which wandb >= 0.22 answers with a deprecation warning.
        wandb_logger._wandb_init.pop("anonymous", None)
        loggers.append(wandb_logger)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(resolved)
    return loggers


def finish_loggers(loggers: list[Logger]) -> None:
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()


def trainer_for(
    cfg: DictConfig, run_dir: Path, callbacks: list[L.Callback], loggers: list[Logger], **overrides
) -> L.Trainer:
    kwargs = {**OmegaConf.to_container(cfg.trainer, resolve=True), **overrides}
    if kwargs.get("use_distributed_sampler", False):
        raise ConfigError("trainer.use_distributed_sampler must stay false: CxrDataModule shards the data itself")
    # The datamodule's ExactlyOnceSampler already gives each process its share; Lightning must not re-shard it.
    kwargs["use_distributed_sampler"] = False
    if SLURMEnvironment.detect():  # callbacks/slurm_requeue.py handles the time-limit signal instead of Lightning
        kwargs["plugins"] = [SLURMEnvironment(auto_requeue=False)]
    kwargs["enable_model_summary"] = False  # each stage's PartsSummary line instead (callbacks/parts_summary.py)
    return L.Trainer(**kwargs, callbacks=callbacks, logger=loggers, default_root_dir=run_dir)


def train_autoencoder(cfg: DictConfig, root: Path, run_dir: Path) -> Path:
    """Train the VAE on the training images, measure held-out reconstruction before/after, cache it."""
    folder = vae_cache_folder(cfg, root)
    if (folder / "config.json").is_file() and cfg.stage != "autoencoder":
        report_line(f"[autoencoder] reusing the VAE trained on this data: {folder}")
        return folder
    L.seed_everything(cfg.seed, workers=True)
    started = time.perf_counter()
    ae_cfg = cfg.autoencoder
    datamodule = build_datamodule(cfg, root, ae_cfg.batch_size)
    module = AutoencoderModule(
        build_vae(cfg.model, cfg.data.resolution, folder=None),
        ae_cfg.learning_rate,
        ae_cfg.kl_weight,
        ae_cfg.reconstruction_loss,
    )
    loggers = build_loggers(cfg, run_dir, "autoencoder")
    profiler = stage_profiler(run_dir, "autoencoder")
    trainer = trainer_for(
        cfg,
        run_dir,
        [ReconstructionGridCallback(run_dir / "images"), PartsSummary("autoencoder")],
        loggers,
        profiler=profiler,
        max_steps=ae_cfg.max_steps,
        val_check_interval=max(1, ae_cfg.max_steps // 2),
        check_val_every_n_epoch=None,
        limit_val_batches=ae_cfg.val_batches,
        enable_checkpointing=False,
        inference_mode=False,  # its metric is updated by validate() before fit() and again after
        gradient_clip_val=None,
    )
    before = trainer.validate(module, datamodule=datamodule, verbose=False)[0]["autoencoder/val_reconstruction_mse"]
    trainer.fit(module, datamodule=datamodule)
    after = trainer.validate(module, datamodule=datamodule, verbose=False)[0]["autoencoder/val_reconstruction_mse"]
    finish_loggers(loggers)
    if trainer.is_global_zero:  # alone (no collective): the others wait at the barrier below, then load the folder
        # Measured on the training split's first batches in one-process order, whatever the process count.
        scaling = module.latent_scaling_factor(itertools.islice(datamodule.train_loader(world_size=1, rank=0), 8))
        module.vae.register_to_config(scaling_factor=cfg.model.vae.scaling_factor or scaling)
        staging = folder.with_name(folder.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        module.vae.save_pretrained(staging, safe_serialization=True)
        report = {
            "val_reconstruction_mse_before": before,
            "val_reconstruction_mse_after": after,
            "latent_scaling_factor": scaling,
            "steps": trainer.global_step,
            "seconds": round(time.perf_counter() - started, 1),
            "data_root": str(root),
        }
        (staging / "training.json").write_text(json.dumps(report, indent=2))
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
        report_line(
            f"[autoencoder] held-out reconstruction MSE {before:.4f} -> {after:.4f} "
            f"in {report['seconds']} s; VAE cached at {folder}"
        )
        report_line(f"[autoencoder] time: {describe_time(profiler, report['seconds'])}")
    trainer.strategy.barrier()
    return folder


def evaluation_callbacks(cfg: DictConfig, root: Path, run_dir: Path) -> list[L.Callback]:
    """The periodic in-training evaluations (grounding, fidelity), each enabled by its ``callbacks.*`` config."""
    callbacks: list[L.Callback] = []
    if cfg.callbacks.attention_heatmaps.enabled:
        callbacks.append(AttentionHeatmapCallback.from_config(cfg, root, run_dir / "images"))
    if cfg.callbacks.grounding.enabled:
        callbacks.append(GroundingCallback.from_config(cfg, root))
    if cfg.callbacks.fidelity.enabled:
        callbacks.append(FIDCallback.from_config(cfg, root))
    if cfg.callbacks.tradeoff_panel.enabled:  # after both: it reads what they logged at the step
        callbacks.append(TradeoffPanelCallback())
    return callbacks


def train_diffusion(cfg: DictConfig, root: Path, vae_folder: Path | None, run_dir: Path) -> dict[str, Path]:
    L.seed_everything(cfg.seed, workers=True)
    module = LatentDiffusionModule.from_config(cfg, vae_folder)
    read_latents = uses_cached_latents(cfg, module)
    report_line(f"[data] diffusion trains on {'cached VAE latents' if read_latents else 'pixels'} ({cfg.data.format})")
    datamodule = build_datamodule(cfg, root, cfg.data.batch_size, tokenizer=module.tokenizer, read_latents=read_latents)
    limit = cfg.train.checkpoints_total_limit
    checkpoints = ModelCheckpoint(  # Lightning's documented "last k": the top k by step, mode max
        dirpath=run_dir / "checkpoints",
        filename="step{step:06d}",
        auto_insert_metric_name=False,
        every_n_train_steps=cfg.train.checkpointing_steps,
        monitor="step",
        mode="max",
        save_top_k=-1 if limit is None else limit,
    )
    # last.ckpt, the run's newest resumable state, on its own: replaced atomically at each checkpointing step, at the
    # end of training and on SIGTERM or a crash; never deleted. Before `checkpoints`: never older than a step file.
    last = LastCheckpoint(run_dir / "checkpoints" / "last.ckpt", cfg.train.checkpointing_steps)
    samples = SampleGridCallback(
        cfg.sampling.validation_prompts,
        run_dir / "images",
        cfg.callbacks.sample_grid.every_n_steps,
        cfg.sampling.num_inference_steps,
        cfg.sampling.guidance_scale,
        seed=cfg.seed,
    )
    callbacks: list[L.Callback] = [last, checkpoints, LearningRateMonitor(logging_interval="step"), samples]
    if "SLURM_JOB_ID" in os.environ:
        callbacks.append(SlurmRequeue(last, os.environ["SLURM_JOB_ID"]))
    callbacks += [DataReportCallback(run_dir / DATA_REPORT_FILE), *evaluation_callbacks(cfg, root, run_dir)]
    callbacks.append(PartsSummary("diffusion"))
    if cfg.callbacks.export_pipeline:
        callbacks.append(ExportPipelineCallback(run_dir / "pipeline"))
    loggers = build_loggers(cfg, run_dir, "diffusion")
    profiler = stage_profiler(run_dir, "diffusion")
    trainer = trainer_for(cfg, run_dir, callbacks, loggers, profiler=profiler)
    checkpoint = resume_checkpoint(cfg, run_dir)
    fit_started = time.perf_counter()
    try:  # weights_only: a checkpoint never runs code when it is unpickled
        trainer.fit(module, datamodule=datamodule, ckpt_path=checkpoint, weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"refusing to load checkpoint '{checkpoint}': it holds objects that would run code when unpickled"
        ) from error
    except SIGTERMException:
        pass  # the scheduler's time limit: LastCheckpoint has written last.ckpt; reported below
    fit_seconds = time.perf_counter() - fit_started
    report_line(f"[diffusion] time in fit: {describe_time(profiler, fit_seconds)}")
    # last.ckpt already holds the final (or interrupted) state: a logger that hangs while finishing cannot lose it.
    finish_loggers(loggers)
    if trainer.interrupted:
        raise SystemExit(
            f"[interrupted] at step {trainer.global_step}; {last.path} holds that state. "
            f"Continue with: python train.py <the same arguments> resume={last.path}"
            if last.path.is_file()
            else f"[interrupted] at step {trainer.global_step}, before training started: no checkpoint written"
        )
    outputs = {
        "checkpoint": last.path,
        "metrics": run_dir / "diffusion" / "metrics.csv",
    }
    if samples.written:
        outputs["samples"] = samples.written[-1]
    if cfg.callbacks.export_pipeline:
        outputs["pipeline"] = run_dir / "pipeline"
        if module.adapted:
            outputs["lora"] = run_dir / "pipeline_lora"  # ExportPipelineCallback's LoRA folder
    return outputs


def run_stages(cfg: DictConfig) -> dict[str, Path]:
    run_dir = make_run_dir(cfg)
    if rank_zero_only.rank == 0:
        OmegaConf.save(cfg, run_dir / "config.yaml")
    started = time.perf_counter()
    report_line(f"[openmp] {configs.process_defaults.OPENMP_WAITING}")
    root = resolve_data_root(cfg.data)
    report_line(
        f"[data] {root} (fingerprint {dataset_fingerprint(root)}; ready in {time.perf_counter() - started:.0f} s)"
    )
    vae_folder = None
    if cfg.stage in ("all", "autoencoder") and cfg.model.vae.pretrained == "auto":
        vae_folder = train_autoencoder(cfg, root, run_dir)
    elif cfg.stage == "diffusion" and cfg.model.vae.pretrained == "auto":
        vae_folder = vae_cache_folder(cfg, root)
        if not (vae_folder / "config.json").is_file():
            raise FileNotFoundError(
                f"stage=diffusion with model.vae.pretrained=auto: no cached VAE at {vae_folder}; "
                "run stage=autoencoder (or stage=all) first"
            )
    outputs = {"run_dir": run_dir, "config": run_dir / "config.yaml"}
    if cfg.stage != "autoencoder":
        diffusion_started = time.perf_counter()
        outputs |= train_diffusion(cfg, root, vae_folder, run_dir)
        report_line(f"[diffusion] {cfg.trainer.max_steps} steps in {time.perf_counter() - diffusion_started:.0f} s")
    report_line(f"\n[done] in {time.perf_counter() - started:.0f} s")
    data_report = run_dir / DATA_REPORT_FILE
    if data_report.is_file():  # what the data left out: the same counts as the data log and W&B
        outputs["data_report"] = data_report
        for line in describe_data_report(json.loads(data_report.read_text())):
            report_line(f"  {'data':<13}{line}")
    for name, path in outputs.items():
        report_line(f"  {name:<13}{path}")
    if (run_dir / "wandb").is_dir():
        report_line(f"  {'wandb':<13}{run_dir / 'wandb'}  (offline: `wandb sync {run_dir / 'wandb'}/offline-run-*`)")
    return outputs


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    names_the_run = RUN_NAME_VARIABLE not in os.environ  # else a process Lightning spawned for this run
    try:
        return run_stages(cfg)
    finally:
        if names_the_run:  # a later run in this process gets its own folder
            os.environ.pop(RUN_NAME_VARIABLE, None)


if __name__ == "__main__":
    try:
        main()
    except ConfigError as error:  # a user's typo deserves one clear line, not a traceback
        raise SystemExit(f"config error: {error}") from None

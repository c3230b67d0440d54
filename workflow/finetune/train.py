"""LoRA fine-tuning of the student with LLaMA-Factory: write the run's YAML (+ DeepSpeed config), run it.

Called by ``rule finetune`` with the core interpreter; LLaMA-Factory itself runs in its own
environment through ``finetune.llamafactory_cli`` (``.venv-lf/bin/llamafactory-cli`` by default, any
conda env's on a cluster)::

    python -m workflow.finetune.train --dataset-dir DATA --output-dir ADAPTER --settings '{...}' --gpus 6

* ``ADAPTER/train.yaml`` (and ``ADAPTER/deepspeed.json`` when DeepSpeed is configured) are written
  first, so a run is reproducible by hand: ``FORCE_TORCHRUN=1 NPROC_PER_NODE=6 llamafactory-cli train
  ADAPTER/train.yaml``.
* More than one GPU (or node) launches through torchrun: ``FORCE_TORCHRUN=1``, ``NPROC_PER_NODE`` =
  GPUs per node, ``NNODES``/``NODE_RANK``/``MASTER_ADDR``/``MASTER_PORT`` for several nodes (one
  ``srun`` task per node inside the SLURM allocation).
* The loss of every logged step is copied from LLaMA-Factory's ``trainer_log.jsonl`` to the log and to
  ``ADAPTER/loss.tsv``; the run fails if no adapter was written or the loss is not finite.
* ``--merged-dir`` (or ``--merge-only``) runs ``llamafactory-cli export``: base + adapter merged into a
  standalone model, for servers that cannot load LoRA adapters.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from workflow import cli

log = logging.getLogger(__name__)

DATASET_NAME = "keyinfo_sft"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
PRECISION_FLAGS = {"bf16": {"bf16": True}, "fp16": {"fp16": True}, "fp32": {}}


def training_arguments(settings: dict, dataset_dir: Path, output_dir: Path, deepspeed: Path | None) -> dict:
    """The LLaMA-Factory ``train`` YAML for ``settings`` (the validated ``finetune:`` config section)."""
    lora = settings["lora"]
    args = {
        "model_name_or_path": settings["base_model"],
        "trust_remote_code": False,
        "stage": "sft",
        "do_train": True,
        "finetuning_type": "lora",
        "lora_rank": lora["rank"],
        "lora_alpha": lora["alpha"],
        "lora_dropout": lora["dropout"],
        "lora_target": ",".join(lora["target"]) if isinstance(lora["target"], list) else lora["target"],
        "dataset": DATASET_NAME,
        "dataset_dir": str(dataset_dir),
        "template": settings["template"],
        "cutoff_len": settings["cutoff_len"],
        "overwrite_cache": True,
        "preprocessing_num_workers": settings["preprocessing_workers"],
        "dataloader_num_workers": 0,
        "output_dir": str(output_dir),
        "overwrite_output_dir": True,
        "logging_steps": settings["logging_steps"],
        "save_steps": settings["save_steps"],
        "save_only_model": True,
        "plot_loss": False,
        "report_to": "none",
        "per_device_train_batch_size": settings["per_device_batch_size"],
        "gradient_accumulation_steps": settings["gradient_accumulation"],
        "learning_rate": settings["learning_rate"],
        "num_train_epochs": float(settings["epochs"]),
        "lr_scheduler_type": settings["lr_scheduler"],
        "warmup_ratio": settings["warmup_ratio"],
        "seed": settings["seed"],
        "ddp_timeout": 180000000,
        **PRECISION_FLAGS[settings["precision"]],
    }
    if settings.get("max_steps"):
        args["max_steps"] = settings["max_steps"]
    if deepspeed is not None:
        args["deepspeed"] = str(deepspeed)
    if settings["gpus"] == 0:
        args["use_cpu"] = True
    # Anything else LLaMA-Factory accepts (flash_attn, gradient_checkpointing, ...) passes through.
    args.update(settings.get("extra_args") or {})
    return args


def deepspeed_config(settings: dict) -> dict | None:
    """The ZeRO-3 config file named in the settings, with CPU offload added when asked for."""
    if not settings.get("deepspeed"):
        return None
    config = json.loads(Path(settings["deepspeed"]).read_text())
    if settings.get("deepspeed_offload"):
        zero = config.setdefault("zero_optimization", {})
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return config


def write_run_config(settings: dict, dataset_dir: Path, output_dir: Path) -> Path:
    """Write ``train.yaml`` (+ ``deepspeed.json``) into ``output_dir``; returns the YAML path."""
    output_dir.mkdir(parents=True, exist_ok=True)
    ds_path = None
    ds_config = deepspeed_config(settings)
    if ds_config is not None:
        ds_path = (output_dir / "deepspeed.json").resolve()
        ds_path.write_text(json.dumps(ds_config, indent=2) + "\n")
    yaml_path = output_dir / "train.yaml"
    args = training_arguments(settings, dataset_dir.resolve(), output_dir.resolve(), ds_path)
    yaml_path.write_text(yaml.safe_dump(args, sort_keys=False))
    return yaml_path


def export_arguments(settings: dict, adapter_dir: Path, merged_dir: Path) -> dict:
    return {
        "model_name_or_path": settings["base_model"],
        "adapter_name_or_path": str(adapter_dir),
        "template": settings["template"],
        "finetuning_type": "lora",
        "export_dir": str(merged_dir),
        "export_size": 5,
        "export_device": "cpu" if settings["gpus"] == 0 else "auto",
        "export_legacy_format": False,
    }


def launch_environment(settings: dict, gpus: int, cli_path: str) -> dict[str, str]:
    """Environment for ``llamafactory-cli``: torchrun variables for multi-GPU / multi-node runs."""
    env = dict(os.environ)
    # LLaMA-Factory's launcher calls `torchrun` by name: it must be found next to the configured CLI
    # (a bare `llamafactory-cli`, as in a conda env, is looked up on PATH first).
    cli_dir = Path(shutil.which(cli_path) or cli_path).parent
    env["PATH"] = f"{cli_dir}{os.pathsep}{env.get('PATH', '')}"
    nodes = settings["nodes"]
    if gpus > 1 or nodes > 1:
        env["FORCE_TORCHRUN"] = "1"
        env["NPROC_PER_NODE"] = str(gpus)
        env["NNODES"] = str(nodes)
        env["MASTER_PORT"] = str(settings["master_port"])
        if settings.get("master_addr"):
            env["MASTER_ADDR"] = settings["master_addr"]
    return env


def train_command(settings: dict, cli_path: str, yaml_path: Path) -> list[str]:
    """``llamafactory-cli train``; on several nodes, one srun task per node sets its NODE_RANK."""
    command = [cli_path, "train", str(yaml_path)]
    if settings["nodes"] <= 1:
        return command
    first_node = "$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1)"
    inner = f"NODE_RANK=$SLURM_NODEID MASTER_ADDR=${{MASTER_ADDR:-{first_node}}} exec {shlex.join(command)}"
    return ["srun", f"--nodes={settings['nodes']}", "--ntasks-per-node=1", "bash", "-c", inner]


def read_loss(output_dir: Path) -> list[dict]:
    """Logged training steps (step, loss, learning rate, epoch) from ``trainer_log.jsonl``."""
    path = output_dir / "trainer_log.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            steps.append({k: record.get(k) for k in ("current_steps", "total_steps", "loss", "lr", "epoch")})
    return steps


def run_logged(command: list[str], env: dict[str, str]) -> None:
    """Run ``command``, its output going to our stderr (the rule's log); fail loudly on error."""
    log.info("running: %s", shlex.join(command))
    completed = subprocess.run(command, env=env, stdout=sys.stderr, stderr=sys.stderr, check=False)
    if completed.returncode != 0:
        raise SystemExit(f"{shlex.join(command[:2])} failed with exit code {completed.returncode}")


def check_cli(cli_path: str) -> None:
    if shutil.which(cli_path) is None:
        raise SystemExit(
            f"config: finetune.llamafactory_cli {cli_path!r} is not executable (run `make setup-lf`)"
        )


def merge(settings: dict, adapter_dir: Path, merged_dir: Path, cli_path: str) -> None:
    """``llamafactory-cli export``: base + adapter -> one standalone model in ``merged_dir``."""
    check_cli(cli_path)
    export_yaml = adapter_dir / "export.yaml"
    args = export_arguments(settings, adapter_dir.resolve(), merged_dir.resolve())
    export_yaml.write_text(yaml.safe_dump(args, sort_keys=False))
    run_logged([cli_path, "export", str(export_yaml)], launch_environment(settings, 1, cli_path))
    if not (merged_dir / "config.json").exists():
        raise SystemExit(f"llamafactory-cli export wrote no model into {merged_dir}")


def finetune(
    settings: dict,
    dataset_dir: Path,
    output_dir: Path,
    cli_path: str,
    merged_dir: Path | None = None,
) -> list[dict]:
    """Train (and optionally merge); returns the logged loss steps. ``settings["gpus"]`` = GPUs per node."""
    if not settings.get("base_model"):
        raise SystemExit("config: finetune.base_model must name the base model folder")
    check_cli(cli_path)
    yaml_path = write_run_config(settings, dataset_dir, output_dir)
    env = launch_environment(settings, settings["gpus"], cli_path)
    run_logged(train_command(settings, cli_path, yaml_path), env)

    missing = [name for name in ADAPTER_FILES if not (output_dir / name).exists()]
    if missing:
        raise SystemExit(f"LLaMA-Factory finished without writing {missing} in {output_dir}")
    steps = read_loss(output_dir)
    with (output_dir / "loss.tsv").open("w") as handle:
        handle.write("step\ttotal_steps\tloss\tlearning_rate\tepoch\n")
        for s in steps:
            handle.write(f"{s['current_steps']}\t{s['total_steps']}\t{s['loss']}\t{s['lr']}\t{s['epoch']}\n")
            log.info("step %s/%s loss %.4f", s["current_steps"], s["total_steps"], s["loss"])
    if not steps or not all(math.isfinite(s["loss"]) for s in steps):
        raise SystemExit(f"no finite training loss logged in {output_dir}/trainer_log.jsonl")
    if merged_dir is not None:
        merge(settings, output_dir, merged_dir, cli_path)
    return steps


def main(argv: list[str] | None = None) -> None:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--dataset-dir", type=Path, help="folder with dataset_info.json + SFT data")
    p.add_argument("--output-dir", type=Path, required=True, help="adapter output folder")
    p.add_argument("--settings", required=True, help="the `finetune:` config section as JSON")
    p.add_argument("--gpus", type=int, default=None, help="GPUs per node (default: finetune.gpus)")
    p.add_argument("--merged-dir", type=Path, default=None, help="also merge adapter + base into this folder")
    p.add_argument("--merge-only", action="store_true", help="only merge an existing adapter (--merged-dir)")
    p.add_argument(
        "--write-only", action="store_true", help="write train.yaml / deepspeed.json, do not train"
    )
    args = p.parse_args(argv)
    cli.setup_logging(args.verbose)
    settings = json.loads(args.settings)
    if args.gpus is not None:
        settings["gpus"] = args.gpus
    cli_path = settings["llamafactory_cli"]
    if args.merge_only:
        if args.merged_dir is None:
            p.error("--merge-only needs --merged-dir")
        merge(settings, args.output_dir, args.merged_dir, cli_path)
        return
    if args.dataset_dir is None:
        p.error("--dataset-dir is required to train")
    if args.write_only:
        log.info("wrote %s", write_run_config(settings, args.dataset_dir, args.output_dir))
        return
    steps = finetune(settings, args.dataset_dir, args.output_dir, cli_path, args.merged_dir)
    log.info("finetune: %d logged steps, final loss %.4f", len(steps), steps[-1]["loss"])


if __name__ == "__main__":
    main()

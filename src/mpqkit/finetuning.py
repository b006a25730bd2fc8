"""``finetune``: a plan quantized, then fine-tuned with LSQ on the train split (``quant/finetune.py``), resumable."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from torch import nn

from .applying import apply_plan, save_quantized
from .errors import DataError, MpqkitError
from .evaluation import evaluate_model
from .fileutil import atomic_write_text, json_text, writer_lock
from .loading import check_compatible, check_out_dir, load_model, load_split, on_device
from .plan import Plan
from .quant.apply import model_device
from .quant.finetune import CHECKPOINT, FinetuneConfig
from .quant.finetune import finetune as run_finetune
from .settings import RunSettings, resolve_settings
from .zoo.data import LabeledData, sample_indices
from .zoo.models import ModelBundle

log = logging.getLogger("mpqkit")

#: fewest training images ``finetune`` accepts without ``allow_small_data`` (CIFAR-10 has 50,000)
MIN_FINETUNE_IMAGES = 5_000


def finetune(model: str | nn.Module | ModelBundle, plan: Plan | str | Path, data: str | LabeledData = "cifar10",
             out: str | Path = "results/finetune", *, epochs: int = 5, lr: float = 1e-4, batch_size: int = 128,
             distill: bool = True, augment: str | None = None, heldout: int = 1000, train_size: int | None = None,
             steps: str = "log", train_norm: bool = False, allow_small_data: bool = False,
             ptq: str | None = None, recon_options: dict[str, Any] | None = None,
             settings: RunSettings | None = None, stop_after: int | None = None, **overrides: Any) -> dict[str, Any]:
    """Quantization-aware fine-tuning (LSQ, ``quant/finetune.py``) of ``model`` quantized by ``plan``
    (with ``ptq``, the plan's own quantizer by default) on ``data``'s train split, never its test split.

    ``heldout`` training images (seeded by the run's seed) are kept out of training and give the
    held-out top-1 after every epoch; ``train_size`` images of the rest make one epoch (a new draw each
    epoch; default all). ``augment`` defaults to "crop-flip" for CIFAR-10, "none" otherwise. ``steps``:
    step sizes trained as ``log s`` ("log") or as ``s`` ("linear"; ``quant/lsq.py``). ``train_norm``:
    also train the norm layers' affine scale and shift (statistics frozen).
    Writes into ``out``: ``checkpoint.pt`` after every epoch (a rerun with the same settings resumes
    from it), then ``model.pt`` (loadable by :func:`load_quantized`, ``mpqkit eval/export --quantized``),
    ``plan.json`` (the plan, bits and budget unchanged, with ``method.params.finetune`` saying how it
    was fine-tuned) and ``summary.json``. Returns the summary (``seconds``: this run's PTQ plus every
    epoch's, resumed ones included); ``stop_after`` stops after that many epochs in total without
    writing the final files (what a killed run leaves).
    """

    s = resolve_settings(settings, overrides)
    name = data.name if isinstance(data, LabeledData) else data
    cfg = FinetuneConfig(epochs=epochs, lr=lr, batch_size=batch_size, distill=distill, seed=s.seed,
                         augment=augment or ("crop-flip" if name == "cifar10" else "none"), train_size=train_size,
                         steps=steps, train_norm=train_norm)
    if not (isinstance(heldout, int) and heldout >= 0):
        raise MpqkitError(f"heldout must be an integer >= 0, got {heldout!r}")
    existed = Path(out).is_dir()
    check_out_dir(out, "fine-tuning folder (--out)")
    with writer_lock(Path(out), "fine-tuning folder", remove_if_empty=not existed):
        return _finetune(model, plan, data, name, Path(out), cfg, heldout, allow_small_data,
                         {"ptq": ptq, "recon_options": recon_options}, s, stop_after)


def _finetune(model: str | nn.Module | ModelBundle, plan: Plan | str | Path, data: str | LabeledData, name: str,
              out: Path, cfg: Any, heldout: int, allow_small_data: bool, ptq: dict[str, Any], s: RunSettings,
              stop_after: int | None) -> dict[str, Any]:

    bundle = load_model(model, s)
    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    train = load_split(data, "train", s)
    check_compatible(bundle, train)
    if len(train) - heldout < MIN_FINETUNE_IMAGES and not allow_small_data:
        raise DataError(f"{name}'s train split has {len(train)} images ({max(len(train) - heldout, 0)} after the "
                        f"{heldout} held out): fine-tuning on fewer than {MIN_FINETUNE_IMAGES} over-fits; pass "
                        f"--allow-small-data to fine-tune anyway")
    order = sample_indices(len(train), len(train), s.seed)
    held, rest = train.subset(order[:heldout]), train.subset(order[heldout:])
    if len(rest) == 0:
        raise DataError(f"no training images are left beside the {heldout} held out: lower --heldout")
    t0 = time.perf_counter()
    qmodel = apply_plan(bundle, plan, data, settings=s, **ptq)
    top1 = (lambda m: evaluate_model(m, held, s.eval_batch_size)["top1"]) if len(held) else None
    before = top1(qmodel) if top1 else None
    ptq_s = time.perf_counter() - t0
    state = run_finetune(qmodel, on_device(bundle.model, s.device), rest.images, rest.labels, cfg,
                         out / CHECKPOINT, heldout=top1, progress=s.progress, stop_after=stop_after)
    record = {**cfg.to_dict(), "epochs_done": state.epochs_done, "train_images": len(rest),
              "heldout_images": len(held), "heldout_top1_before": before,
              "heldout_top1": state.history[-1].get("heldout_top1") if state.history else before,
              "ptq": ptq["ptq"] or "default", "data": name}
    summary = {"model": bundle.name, "device": str(model_device(qmodel)), "finetune": record,
               "history": state.history,
               "ptq_s": ptq_s, "seconds": ptq_s + sum(h["seconds"] for h in state.history),
               "finished": state.epochs_done == cfg.epochs}
    if summary["finished"]:
        tuned = Plan(**{**plan.__dict__, "method_params": {**plan.method_params, "finetune": record}})
        save_quantized(qmodel, tuned, out / "model.pt")
        tuned.save(out / "plan.json")
    atomic_write_text(out / "summary.json", json_text(summary, "the fine-tuning summary", indent=2))
    return summary

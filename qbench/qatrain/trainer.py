"""QAT fine-tuning through ultralytics' DetectionTrainer: resumable, optional distillation, learned ranges, and a
guard that stops a run whose first batches lose far more than the checkpoint's own training did."""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

from .. import safeload
from ..errors import QbenchError
from ..files import atomic_write_text, read_json
from .fakequant import IN_RANGE_PARAM, RANGE_PARAM, is_prepared

DONE = "done.json"  # written into train/ when fine-tuning finished (ultralytics strips last.pt's epoch at the end)
SESSIONS = "sessions.json"  # one entry per training call: epochs run, seconds, device
SETTINGS = "qat_settings.json"  # the fine-tuning settings ultralytics' train_args cannot hold, checked on resume
NBS = 64  # ultralytics' nominal batch size: gradients accumulate to it before each optimizer step
GUARD_BATCHES = 8  # the loss guard reads the running mean loss after this many batches (or the first epoch's end)
GUARD_FACTOR = 2.5  # ... and stops when it exceeds this many times the checkpoint's own last training loss
LOSS_KEYS = ("train/box_loss", "train/cls_loss", "train/dfl_loss")


class DistillLoss:
    """ultralytics' detection loss plus `weight` x a distillation term from the FP32 model on the same batch.

    The term pulls the fake-quant model's raw head outputs towards the FP32 model's: class scores by the binary KL
    divergence from the FP32 sigmoid scores (normalised by their sum, as ultralytics normalises its class loss),
    and each box side's DFL distribution by the KL divergence from the FP32 one, weighted per anchor by the FP32
    top class score. Both models see the same augmented images; the labels still drive the detection loss.
    A plain object (not an nn.Module), so the teacher is no parameter of the student, its EMA or the optimizer.
    """

    def __init__(self, base, teacher, weight: float):
        self.base, self.teacher, self.weight = base, teacher, float(weight)

    def __getattr__(self, name):  # the trainer calls criterion.update() etc. when the base loss has them
        if name in ("base", "teacher", "weight") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def __call__(self, preds, batch):
        import torch
        import torch.nn.functional as F

        loss, items = self.base(preds, batch)
        p = self.base.parse_output(preds)
        if not isinstance(p, dict) or "scores" not in p or "boxes" not in p:
            raise QbenchError("--distill supports detection heads whose training output has 'boxes' and 'scores' "
                              "(YOLOv8/11-style Detect); this model's has not.")
        with torch.no_grad():
            t = self.base.parse_output(self.teacher(batch["img"]))
        t_logit = t["scores"].float()
        t_cls = t_logit.sigmoid()
        bce = F.binary_cross_entropy_with_logits  # minus the FP32 scores' own entropy: a KL divergence, 0 at a match
        cls = (bce(p["scores"].float(), t_cls, reduction="sum") - bce(t_logit, t_cls, reduction="sum")) \
            / t_cls.sum().clamp(min=1)
        b, c, n = p["boxes"].shape
        s_log = p["boxes"].float().reshape(b, 4, c // 4, n).log_softmax(2)
        t_log = t["boxes"].float().reshape(b, 4, c // 4, n).log_softmax(2)
        kl = (t_log.exp() * (t_log - s_log)).sum(2).sum(1)  # (b, n): the four sides of each anchor
        w = t_cls.amax(1)
        dfl = (kl * w).sum() / w.sum().clamp(min=1e-6)
        extra = self.weight * (cls + dfl) * b  # ultralytics sums the loss vector (box, cls, dfl): add it once
        return loss + extra / loss.numel(), items


def reference_losses(ckpt: dict | None) -> dict | None:
    """The checkpoint's own training loss in its last epoch ({box, cls, dfl, total}), or None if it kept none."""
    res = (ckpt or {}).get("train_results") or {}
    try:
        last = {k.split("/")[1].replace("_loss", ""): float(res[k][-1]) for k in LOSS_KEYS}
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    if not all(math.isfinite(v) and v > 0 for v in last.values()):
        return None
    return {**last, "total": sum(last.values())}


def _loss_guard(reference: dict, factor: float = GUARD_FACTOR):
    """An on_train_batch_end callback that stops the first epoch of a fresh run once its running mean loss, read
    after GUARD_BATCHES batches (or at the epoch's last batch), is `factor` times the checkpoint's own."""
    state = {"batches": 0, "checked": False}

    def check(trainer):
        if state["checked"] or trainer.tloss is None:
            return
        state["batches"] += 1
        if state["batches"] < min(GUARD_BATCHES, len(trainer.train_loader)):
            return
        state["checked"] = True
        now = {k: float(v) for k, v in trainer.tloss.items()}
        total = sum(now.values())
        state["first_batches"] = {**now, "total": total, "batches": state["batches"]}
        if total > factor * reference["total"]:
            parts = " / ".join(f"{v:.2f}" for v in now.values())
            ref = " / ".join(f"{reference[k]:.2f}" for k in ("box", "cls", "dfl"))
            raise QbenchError(f"QAT's first {state['batches']} batches lose {total:.2f} ({parts}, box / cls / dfl), "
                              f"{total / reference['total']:.1f}x the checkpoint's own last training loss "
                              f"{reference['total']:.2f} ({ref}): the fake-quant model does not compute what the "
                              "checkpoint does, so no result is written; please report this model's architecture.")

    check.state = state
    return check


def _trainer_class(range_lr: float, teacher=None, distill: float = 0.0):
    from ultralytics.models.yolo.detect import DetectionTrainer

    from .. import ultra  # noqa: F401

    class QATTrainer(DetectionTrainer):
        """DetectionTrainer that trains the fake-quant model it is given (or, on resume, the checkpoint's); learned
        activation ranges get their own parameter group (lr `range_lr`, no weight decay, same LR schedule)."""

        def get_model(self, cfg=None, weights=None, verbose=True):
            if weights is not None and is_prepared(weights):
                return weights  # resume: the checkpoint holds the fake-quant model itself
            raise RuntimeError("QATTrainer needs a prepared model (trainer.model) or a QAT checkpoint to resume")

        def _setup_train(self):
            super()._setup_train()
            if distill > 0:  # after the EMA copy: the EMA and the checkpoints never hold the teacher
                m = self.model.module if hasattr(self.model, "module") else self.model
                teacher.to(self.device).eval()
                for p in teacher.parameters():
                    p.requires_grad_(False)
                m.criterion = DistillLoss(m.init_criterion(), teacher, distill)

        def build_optimizer(self, model, *args, **kwargs):
            opt = super().build_optimizer(model, *args, **kwargs)
            ranges = [p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1] in (RANGE_PARAM, IN_RANGE_PARAM)]
            if ranges:
                ids = {id(p) for p in ranges}
                for group in opt.param_groups:
                    group["params"] = [p for p in group["params"] if id(p) not in ids]
                opt.add_param_group({**{k: v for k, v in opt.param_groups[0].items() if k != "params"},
                                     "params": ranges, "lr": range_lr, "weight_decay": 0.0,
                                     "param_group": "qat_ranges"})
            return opt

    return QATTrainer


@contextlib.contextmanager
def fp32_checkpoints():
    """ultralytics saves the EMA with `.half()` (save_model, strip_optimizer): a QAT model's weights then land on
    different int8 codes than the ones it was validated with. While training, `Module.half` is a no-op, so
    last.pt/best.pt hold the fp32 EMA that ultralytics' per-epoch validation scored."""
    import torch.nn as nn

    half = nn.Module.half
    nn.Module.half = lambda self: self
    try:
        yield
    finally:
        nn.Module.half = half


def settings_flag(key: str, value) -> str:
    """The `qbench qat` option that gives setting `key` (train/qat_settings.json) the value `value`."""
    if key == "learn_ranges":
        return "--learn-ranges" if value else "--freeze-ranges"
    return f"--{key.replace('_', '-')} {value}"


def learned_any(model) -> bool:
    return any(n.rsplit(".", 1)[-1] in (RANGE_PARAM, IN_RANGE_PARAM) for n, _ in model.named_parameters())


def steps_per_epoch_nbs(n_images: int, batch: int) -> int:
    """ultralytics' nominal batch size, lowered where an epoch has fewer batches than it accumulates (64 images):
    every epoch then makes at least one optimizer step (otherwise a short epoch changes nothing at all)."""
    batches = max(1, math.ceil(n_images / batch))
    return min(NBS, batch * batches)


def last_epoch(tdir: Path) -> int:
    csv = tdir / "results.csv"
    if not csv.exists():
        return 0
    rows = [r for r in csv.read_text().strip().splitlines()[1:] if r.strip()]
    return int(float(rows[-1].split(",")[0])) if rows else 0


def results(tdir: Path) -> list[dict]:
    csv = tdir / "results.csv"
    if not csv.exists():
        return []
    lines = csv.read_text().strip().splitlines()
    head = [h.strip() for h in lines[0].split(",")]
    return [{h: float(v) for h, v in zip(head, r.split(","))} for r in lines[1:] if r.strip()]


def train_stage(model, weights: Path, data, out: Path, epochs: int, imgsz: int, batch: int, lr0: float,
                range_lr: float, teacher, distill: float, device: str, workers: int, callbacks: dict | None,
                overrides: dict, n_train: int, reference: dict | None, resume_settings: dict) -> dict:
    """Fine-tune (or resume); returns {"resumed_from_epoch", "sessions", "skipped", "loss_guard"}.

    resume_settings: what an interrupted run in `out` must have been started with (recipe, weights digest, data,
    ...); any difference is refused, naming it, so a resumed run never mixes two configurations.
    """
    tdir = out / "train"
    last = tdir / "weights" / "last.pt"
    done = tdir / DONE
    sessions = read_json(tdir / SESSIONS, [])
    if done.exists():
        return {"resumed_from_epoch": None, "sessions": sessions, "skipped": True, "loss_guard": None}
    Trainer = _trainer_class(range_lr, teacher, distill)
    learned = learned_any(model)
    settings = {"learn_ranges": learned, "distill": distill, **({"range_lr": range_lr} if learned else {}),
                **resume_settings}
    resume_from = None
    if last.exists():
        ck = safeload.load(last)
        ck_epochs = int((ck.get("train_args") or {}).get("epochs", -1))
        resume_from = int(ck.get("epoch", -1)) + 1
        del ck
        if ck_epochs != epochs:
            raise QbenchError(f"'{out}' holds an interrupted QAT run of {ck_epochs} epochs; re-run with --epochs "
                              f"{ck_epochs} to resume it, or choose another --out.")
        before = read_json(tdir / SETTINGS, None)
        if before is not None and before != settings:
            changed = sorted(k for k in {*before, *settings} if before.get(k) != settings.get(k))
            flags = [settings_flag(k, before.get(k)) for k in changed if k in ("learn_ranges", "distill", "range_lr")
                     and k in before]
            other = [f"{k} ({before.get(k)!s} then, {settings.get(k)!s} now)" for k in changed
                     if k not in ("learn_ranges", "distill", "range_lr")]
            how = f"re-run with {' '.join(flags)}" if flags and not other else "re-run the original command"
            raise QbenchError(f"'{out}' holds an interrupted QAT run with other settings"
                              f"{': ' + ', '.join(other) if other else ''}; {how} to resume it, or choose another "
                              f"--out.")
    args = dict(model=str(weights), data=str(Path(data).resolve()), epochs=epochs, imgsz=imgsz, batch=batch,
                device=device, workers=workers, seed=0, deterministic=True, amp=False, plots=False,
                project=str(out.resolve()), name="train", exist_ok=True, verbose=False,
                optimizer="AdamW", lr0=lr0, lrf=0.1, warmup_epochs=0, cos_lr=False, save_period=-1, val=True,
                nbs=steps_per_epoch_nbs(n_train, batch),
                # no mosaic: QAT fine-tunes in the regime the original training ended in (its close_mosaic
                # epochs); ultralytics closes mosaic at epoch `epochs - close_mosaic`, here the first
                close_mosaic=epochs)
    args.update(overrides)
    t0 = time.time()
    tdir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(tdir / SETTINGS, json.dumps(settings) + "\n")
    guard = None
    if resume_from is not None and resume_from >= epochs:  # finished, but interrupted before the done marker
        trainer = None
    elif resume_from is not None and resume_from > 0:
        trainer = Trainer(overrides={**args, "resume": str(last), "save_dir": str(tdir.resolve())})
    else:
        trainer = Trainer(overrides=args)
        trainer.model = model
        resume_from = 0
        if reference is not None:
            guard = _loss_guard(reference)
            trainer.add_callback("on_train_batch_end", guard)
    if trainer is not None:
        for event, fn in (callbacks or {}).items():
            trainer.add_callback(event, fn)
        try:
            with fp32_checkpoints():
                trainer.train()
        finally:
            end = last_epoch(tdir)
            sessions.append({"start_epoch": resume_from + 1, "end_epoch": end, "seconds": round(time.time() - t0, 1),
                             "device": str(trainer.device)})
            atomic_write_text(tdir / SESSIONS, json.dumps(sessions, indent=2) + "\n")
    atomic_write_text(done, json.dumps({"epochs": epochs}) + "\n")
    return {"resumed_from_epoch": resume_from + 1 if resume_from else None, "sessions": sessions, "skipped": False,
            "loss_guard": None if guard is None else {"reference": reference, "factor": GUARD_FACTOR,
                                                      "first_batches": guard.state.get("first_batches")}}

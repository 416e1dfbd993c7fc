"""`ClassificationTrainer`: sequence classification on the shared loop.

Model: :class:`~llm_trainer.model.heads.SequenceClassifier` — the backbone's final hidden state at the last real token
(left or right padding) through a linear ``score`` head (``num_labels`` outputs), as transformers'
``*ForSequenceClassification`` models do. ``init_weights_path``: a language-model folder (a new head on it) or a
classifier folder (our export, or a transformers one: backbone and head loaded).

What trains (``ClassifyConfig.trainable``): everything (with ``TrainConfig.lora``: the LoRA adapters and the head), the
head only, or the last ``trainable_blocks`` decoder blocks (+ final norm) and the head.

Loss: cross-entropy of the logits, ``sum_i w[y_i] · CE_i`` over the micro-batch's samples with the optional class
weights ``w`` (1 without), and the loop divides by the samples of the window (the unit). Note that torch's
``cross_entropy(weight=w, reduction='mean')`` divides by ``sum_i w[y_i]`` instead: here a class weight of 2 counts a
sample twice against the same denominator, so equal weights change nothing. Logged per step: ``loss`` and
``accuracy``; per evaluation of ``eval_file_dataset``: ``eval_loss``, ``eval_accuracy``, ``eval_macro_f1`` (macro
average over the classes that occur in the labels or the predictions, as scikit-learn's ``f1_score(average='macro')``)
and ``eval_confusion_matrix`` (rows: true class, columns: predicted; a JSON list in ``metrics.jsonl``), drawn to
``output_dir/confusion_matrix.png``.

Data: prepared classify folders (``prepare_data --stage classify``, :mod:`llm_trainer.data.classify`) or a dataset
object whose items are ``{"input_ids", "labels"}``. ``num_labels``/``label_names`` come from the config or else from
the training data's ``meta.json``; every data set must agree with them.

Export (``output_dir/final``): a transformers ``*ForSequenceClassification`` folder (``score.weight``, ``num_labels``,
``id2label``, ``pad_token_id`` = the id batches are padded with) + tokenizer; LoRA merged, adapters beside it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..data.collate import pad_with_mask
from ..data.formats import DataError
from ..model.heads import SequenceClassifier, is_classifier_folder
from .base import BaseTrainer, LossOutput
from .collective import even_batches, rank_shard
from .setup import checkpointed_layers, export_model, is_vlm_config

__all__ = ["ClassificationTrainer", "ClassificationCollate", "confusion_matrix", "classification_scores"]

CONFUSION_PNG = "confusion_matrix.png"


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor, num_labels: int) -> torch.Tensor:
    """``[K, K]`` int64 counts: row = true class, column = predicted class."""
    flat = labels.long().reshape(-1) * num_labels + predictions.long().reshape(-1)
    return torch.bincount(flat.cpu(), minlength=num_labels * num_labels).view(num_labels, num_labels)


def classification_scores(matrix: torch.Tensor) -> dict[str, float]:
    """``accuracy`` and ``macro_f1`` of a confusion matrix. F1 of class c = 2·TP / (2·TP + FP + FN); the macro
    average runs over the classes present in the labels or the predictions (scikit-learn's convention)."""
    m = matrix.double()
    tp, true, pred = m.diag(), m.sum(1), m.sum(0)
    total = float(m.sum())
    present = (true + pred) > 0
    f1 = torch.where(present, 2 * tp / (true + pred).clamp(min=1), torch.zeros_like(tp))
    return {"accuracy": float(tp.sum()) / total if total else 0.0,
            "macro_f1": float(f1[present].mean()) if bool(present.any()) else 0.0}


class ClassificationCollate:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` ``[B]`` (class ids). Picklable."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = int(pad_token_id)

    def __call__(self, items: Sequence[dict]) -> dict[str, torch.Tensor]:
        ids, mask = pad_with_mask([it["input_ids"] for it in items], self.pad_token_id)
        labels = torch.tensor([int(it["labels"]) for it in items], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _is_dataset_object(files: Any) -> bool:
    from ..data.datasets import FileDataset
    if isinstance(files, (str, Path, FileDataset)):
        return False
    return hasattr(files, "__getitem__") and not (isinstance(files, (list, tuple)) and files
                                                  and isinstance(files[0], (str, Path)))


class ClassificationTrainer(BaseTrainer):
    """``ClassificationTrainer(train_config=TrainConfig(..., classify_config=ClassifyConfig(...))).train()``."""

    stage = "classify"
    stage_slot = "classify_config"
    loss_unit = "samples"

    # ---------------------------------------------------------------------------------------------- model
    def build_model(self) -> torch.nn.Module:
        cfg, sc = self.config, self.stage_config
        if is_vlm_config(self.model_config):
            raise ValueError("ClassificationTrainer: VLM models are not supported (model_config is a VLMConfig)")
        self.num_labels, self.label_names = self.resolve_labels()
        self.class_weights = None
        if sc.class_weights is not None:
            if len(sc.class_weights) != self.num_labels:
                raise ValueError(f"ClassifyConfig.class_weights has {len(sc.class_weights)} entries for "
                                 f"{self.num_labels} classes")
            self.class_weights = torch.tensor(sc.class_weights, dtype=torch.float32, device=self.device)
        with self.backend.model_init_context():
            model = SequenceClassifier(self.model_config, self.num_labels, self.label_names)
        path = cfg.init_weights_path
        if path is not None:
            if is_classifier_folder(path):
                model.load_classifier(path)
            elif (Path(path) / "config.json").is_file():
                model.load_backbone(path)
            else:
                raise ValueError(f"TrainConfig.init_weights_path {path!r}: a classifier starts from an HF-format "
                                 f"folder (a language model or a classifier export); resume checkpoints with "
                                 f"resume_from")
        if cfg.lora is not None:
            if sc.trainable != "all":
                raise ValueError(f"ClassifyConfig.trainable={sc.trainable!r} cannot be combined with TrainConfig.lora "
                                 f"(LoRA trains the adapters and the head; use trainable='all')")
            from ..model.lora import apply_lora
            apply_lora(model.backbone, r=cfg.lora.r, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                       target_modules=cfg.lora.target_modules)
        elif sc.trainable != "all":
            model.freeze_backbone(sc.trainable_blocks if sc.trainable == "last_blocks" else 0)
        if cfg.gradient_checkpointing is not False:
            model.set_gradient_checkpointing(True, layers=checkpointed_layers(cfg.gradient_checkpointing))
        return model

    def resolve_labels(self) -> tuple[int, list[str]]:
        """``(num_labels, label_names)``: the config's, else the training data's (all data must agree)."""
        sc = self.stage_config
        found: list[tuple[str, int, list[str]]] = []
        for files in (self.config.file_dataset, self.config.eval_file_dataset):
            found += _label_meta(files)
        names = sc.label_names
        for source, _, data_names in found:
            if _default_names(data_names):      # int labels carry no names
                continue
            if names is None:
                names = data_names
            elif data_names != names:
                raise DataError(f"the data's classes {data_names} differ from {names} (prepare every split with the "
                                f"same labels: prepare_data --labels <training folder>)", file=source)
        n = sc.num_labels or (len(names) if names else max((k for _, k, _ in found), default=0))
        if not n:
            raise ValueError("ClassifyConfig.num_labels: the number of classes is unknown (the data is not a prepared "
                             "classify folder); set num_labels")
        if names is not None and len(names) != n:
            raise ValueError(f"ClassifyConfig.num_labels={n} but the classes are {names}")
        for source, data_n, _ in found:
            if data_n > n:
                raise DataError(f"the data has {data_n} classes but the classifier {n}", file=source)
        return n, list(names) if names is not None else [str(i) for i in range(n)]

    # ----------------------------------------------------------------------------------------------- data
    def build_dataset(self, files: Any, split: str):
        if _is_dataset_object(files):
            bad = next((i for i in range(len(files)) if not 0 <= int(files[i]["labels"]) < self.num_labels), None)
            if bad is not None:
                raise DataError(f"label {int(files[bad]['labels'])} is outside [0, {self.num_labels})", record=bad,
                                field="labels")
            return files
        from ..data.classify import ClassifyDataset
        from ..data.datasets import ConcatFileDataset
        paths = [files] if isinstance(files, (str, Path)) else [files[i] for i in range(len(files))]
        opened = lambda p: ClassifyDataset(p, self.config.block_size, vocab_size=self.model_config.vocab_size,  # noqa: E731
                                           tokenizer=self.tokenizer)
        return opened(paths[0]) if len(paths) == 1 else ConcatFileDataset(paths, opened)

    def build_collate(self):
        return ClassificationCollate(self.pad_token_id())

    def count_units(self, batch: dict[str, Any]) -> int:
        return int(batch["labels"].numel())

    def batch_samples(self, batch: dict[str, Any]) -> int:
        return int(batch["labels"].numel())

    # ----------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> LossOutput:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        labels = batch["labels"]
        losses = F.cross_entropy(logits, labels, weight=self.class_weights, reduction="none")
        correct = (logits.detach().argmax(-1) == labels).sum()
        aux = getattr(self.backend.unwrap(model), "_aux_loss", None)
        aux = aux if (aux is not None and aux.requires_grad) else None
        return LossOutput(loss=losses.sum(), aux_loss=aux, metrics={"accuracy": correct})

    # ----------------------------------------------------------------------------------------------- eval
    @torch.no_grad()
    def classification_metrics(self, dataset: Any = None, indices: Sequence[int] | None = None) -> dict[str, Any]:
        """``loss``, ``accuracy``, ``macro_f1`` and ``confusion_matrix`` (nested list) over a dataset (default: the
        eval data, else the training data); every sample once over all ranks (``indices``: this rank's share,
        default all of its :func:`rank_shard`). Collective: every rank calls it."""
        ds = dataset if dataset is not None else (self.eval_dataset or self.train_dataset)
        k = self.num_labels
        matrix = torch.zeros(k, k, dtype=torch.float64)
        loss_sum = torch.zeros(1, dtype=torch.float64)
        model = self.model
        was_training = model.training
        model.eval()
        try:
            mine = list(indices) if indices is not None else rank_shard(len(ds), self.backend)
            for idx, padding in even_batches(self.backend, mine, self.config.batch_size, 0):
                batch = self.to_device(self.collate([ds[i] for i in idx]))
                with self.backend.autocast():
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                if padding:
                    continue
                loss_sum += float(F.cross_entropy(logits.float(), batch["labels"], weight=self.class_weights,
                                                  reduction="sum"))
                matrix += confusion_matrix(batch["labels"], logits.argmax(-1), k).double()
        finally:
            model.train(was_training)
        packed = torch.cat([loss_sum, matrix.reshape(-1)])
        self.backend.all_reduce(packed)
        matrix = packed[1:].view(k, k).round().long()
        n = max(int(matrix.sum()), 1)
        return {"loss": float(packed[0]) / n, **classification_scores(matrix), "confusion_matrix": matrix.tolist()}

    def eval_dataset_metrics(self) -> dict[str, Any]:
        """Held-out loss, accuracy, macro-F1 and confusion matrix (also drawn to ``output_dir/confusion_matrix.png``)."""
        m = self.classification_metrics(self.eval_dataset, self.eval_items(self.eval_dataset))
        if self.backend.is_main:
            from ..plots import plot_confusion_matrix
            plot_confusion_matrix(m["confusion_matrix"], self.label_names, self.output_dir / CONFUSION_PNG,
                                  title=f"step {self.global_step}: accuracy {m['accuracy']:.3f}, "
                                        f"macro-F1 {m['macro_f1']:.3f}")
        return {f"eval_{k}": v for k, v in m.items()}

    def sample_generations(self) -> list[dict[str, str]]:
        return []   # a classifier does not generate

    # --------------------------------------------------------------------------------------------- export
    def export(self) -> Path | None:
        """``output_dir/final``: a transformers ``*ForSequenceClassification`` folder (LoRA merged) + tokenizer."""
        def write(state: dict, plain: SequenceClassifier, path: Path) -> None:
            plain.save_pretrained(path, state_dict=state, pad_token_id=self.pad_token_id())

        return export_model(self.backend, self.model, self.output_dir / "final", self.tokenizer, write=write,
                            adapters=lambda plain: plain.backbone)


def _default_names(names: list[str]) -> bool:
    return names == [str(i) for i in range(len(names))]


def _label_meta(files: Any) -> list[tuple[str, int, list[str]]]:
    """``(source, num_labels, names)`` of each prepared classify folder (or labelled dataset object) in ``files``."""
    if files is None:
        return []
    if _is_dataset_object(files):
        n = getattr(files, "num_labels", None)
        names = getattr(files, "label_names", None)
        return [(type(files).__name__, int(n), list(names or []))] if n else []
    from ..data.indexed import IndexedData
    paths = [files] if isinstance(files, (str, Path)) else [files[i] for i in range(len(files))]
    out = []
    for p in paths:
        meta = IndexedData(p, stages=("classify",)).meta
        out.append((str(p), int(meta.get("num_labels") or 0), list(meta.get("labels") or [])))
    return out

"""Hugging Face ``transformers``: a ``Trainer`` whose checkpoints hold the adapter.

A conditioned transformers model saves merged weights through ``save_pretrained``
(:func:`weightcond.model.guard_save_pretrained`), which is what ``trainer.save_model()`` at
the end of training should write, and what a checkpoint should not: the whole model (94 MB
for MiniLM) for a 2 MB adapter, and weights from which no adapter can be resumed.
:class:`AdapterCheckpointCallback` makes the Trainer's checkpoints adapter checkpoints
(:func:`weightcond.model.adapter_checkpoints`).

Decision (a callback, not a Trainer subclass): a callback composes with any Trainer
(``transformers.Trainer``, TRL's ``SFTTrainer``, a user's subclass) and overrides none of
their private methods. A checkpoint holds the adapter under the model's own ``state_dict``
keys, in ``model.safetensors``, because that is the file the Trainer's resume
(``resume_from_checkpoint``) and ``load_best_model_at_end`` read for a model that is not
PEFT's, with ``load_state_dict(strict=False)``: they then restore the adapter in place,
bit for bit, with no code of ours on the loading side. (:func:`weightcond.save_adapter`'s
format is for loading onto a base model; a checkpoint is for continuing on this one.)

This module imports ``transformers``; ``weightcond`` imports it only when
``weightcond.AdapterCheckpointCallback`` is first used.
"""

from __future__ import annotations

from typing import Any

import transformers
from torch import nn

from ..model import adapter_checkpoints

__all__ = ["AdapterCheckpointCallback"]


class AdapterCheckpointCallback(transformers.TrainerCallback):
    """Make a ``transformers.Trainer``'s checkpoints hold the adapter, not the model.

    Each ``checkpoint-N/`` then holds, besides the Trainer's own files (optimizer,
    scheduler, RNG states, ``trainer_state.json``), a ``model.safetensors`` with the tensors
    of every adapter and every other trainable parameter (a task head you unfroze) under
    the model's ``state_dict`` keys (:func:`weightcond.model.checkpoint_keys`), and
    ``config.json``: the adapter's size, not the model's. ``trainer.train(
    resume_from_checkpoint=...)`` on the model built and conditioned the same way continues
    bit for bit as if never stopped, and ``load_best_model_at_end`` restores the best
    adapter, both through the Trainer's own loading. ``trainer.save_model()`` outside
    training writes the merged model, which ``from_pretrained`` reloads.

    How: after each optimizer step and each epoch (``on_step_end``, ``on_epoch_end``) it
    enters :func:`weightcond.model.adapter_checkpoints` for the trained model, so the
    Trainer's ``save_pretrained`` in the logging, evaluation and saving that follow writes
    an adapter checkpoint; it leaves the block when the checkpoint is saved and when the
    next step, the next epoch or the end of training begins. The model is checked when
    training begins: ``trainer.train()`` raises :class:`~weightcond.LayerTypeError` before
    the first step where it is not a transformers ``PreTrainedModel``, and
    :class:`~weightcond.StateError` where it has no conditioned layers.

    Example::

        wc.condition(model, "sora", target_modules=["query", "value"])
        model.classifier.requires_grad_(True)          # saved in checkpoints too
        trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                       callbacks=[wc.AdapterCheckpointCallback()])
        trainer.train()                                # checkpoint-N/: the adapter
        trainer.train(resume_from_checkpoint=True)     # continues exactly
        trainer.save_model("out")                      # the merged model
    """

    def __init__(self) -> None:
        self._checkpoints: Any = None
        self._entered = False

    def _enter(self) -> None:
        if self._checkpoints is not None and not self._entered:
            self._checkpoints.__enter__()
            self._entered = True

    def _leave(self) -> None:
        if self._entered:
            self._checkpoints.__exit__(None, None, None)
            self._entered = False

    def on_train_begin(self, args: Any, state: Any, control: Any,
                       model: nn.Module | None = None, **kwargs: Any) -> None:
        self._leave()
        self._checkpoints = adapter_checkpoints(model)  # type: ignore[arg-type]

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._leave()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._enter()

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._leave()

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._enter()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._leave()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._leave()
        self._checkpoints = None

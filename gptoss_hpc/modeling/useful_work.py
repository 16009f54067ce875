"""The useful work of each micro-batch, counted on the CPU: its documents' lengths, so MFU counts attention over each
document's own context (``gptoss_hpc.config.flops``) and not over the padded or packed row.

``DocumentLengthsCollator`` wraps the trainer's collator: it reads the lengths from the features it collates (a
packed feature's ``seq_lengths``, else its ``input_ids``; the padding the collator adds is not in them) and the batch
carries them under ``DOC_LENGTHS`` as a tuple of ints, which accelerate's device copy passes through untouched. The
trainer takes the key out before the forward (``UsefulWork.take``) and sums plain Python ints: no tensor is read, so
no host sync is added per micro-batch (tests/test_host_syncs.py). Each rank counts its own micro-batches; rank 0's
totals are what metrics.jsonl logs (``doc_tokens``, ``useful_flops``), so MFU there is rank 0's GPU's.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from gptoss_hpc.config.flops import train_flops
from gptoss_hpc.config.memory import Arch

# The batch key under which a micro-batch's document lengths travel from the collator to the trainer.
DOC_LENGTHS = "gptoss_doc_lengths"


def document_lengths(features: Sequence[Mapping[str, Any]]) -> tuple[int, ...]:
    """The token length of every document in these features: a packed feature holds several (``seq_lengths``)."""
    out: list[int] = []
    for f in features:
        packed = f.get("seq_lengths")
        if packed is not None:
            out.extend(int(n) for n in packed)
        elif f.get("input_ids") is not None:
            out.append(len(f["input_ids"]))
    return tuple(out)


class DocumentLengthsCollator:
    """Wraps a collator: each batch also carries ``DOC_LENGTHS``. A module-level class: the dataloader's worker
    processes pickle it."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, features):
        batch = self.inner(features)
        if isinstance(batch, MutableMapping):
            batch[DOC_LENGTHS] = document_lengths(features)
        return batch


class UsefulWork:
    """This process's running totals of trained documents: tokens and useful FLOPs (None without an Arch)."""

    def __init__(self, arch: Arch | None) -> None:
        self.arch = arch
        self.docs = 0
        self.tokens = 0
        self.flops = 0.0

    def take(self, inputs: MutableMapping[str, Any], *, count: bool = True) -> None:
        """Remove the batch's document lengths (the model must not see the key) and, if ``count``, add them up."""
        lengths = inputs.pop(DOC_LENGTHS, None)
        if not count or not lengths:
            return
        self.docs += len(lengths)
        self.tokens += sum(lengths)
        if self.arch is not None:
            self.flops += train_flops(self.arch, lengths)

    def logs(self) -> dict[str, Any]:
        """What each logged step records: cumulative over this process's training so far (no FLOPs without an
        Arch: a reporter such as TensorBoard warns at every None)."""
        return {"doc_tokens": self.tokens, **({"useful_flops": self.flops} if self.arch is not None else {})}

"""train.gradient_checkpointing_offload: the checkpointed layer inputs wait for the backward in host memory.

Real parts: the tiny gpt-oss with transformers' own gradient checkpointing + PEFT LoRA (gptoss_hpc.bench.train_setup
.prepare, as the train stage builds it), torch's save_on_cpu, and for the stage test the real train stage
(TRL + PEFT) launched through `python -m gptoss_hpc.launch`'s main. On this CPU machine "host memory" is where the
activations already are, so the test checks what can differ: the same loss and gradients, and that every
checkpointed layer's inputs went through the offload hook.
"""

from __future__ import annotations

import json

import pytest
import torch

from gptoss_hpc.config import compose, to_run_config


def _loss_and_grads(offload: bool, packs: list[int]) -> tuple[float, dict[str, torch.Tensor]]:
    from gptoss_hpc.bench.train_setup import prepare

    cfg = to_run_config(
        compose(
            [
                "experiment=demo",
                "lora=all_linear",
                "train.gradient_checkpointing=true",
                f"train.gradient_checkpointing_offload={str(offload).lower()}",
            ]
        )
    )
    torch.manual_seed(0)
    model, knobs = prepare(cfg, "cpu", vocab_size=256)
    assert (len(knobs.offloaded_checkpoints) >= 2) == offload
    model.train()
    ids = torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(1))
    real = torch.autograd.graph.save_on_cpu.__init__

    def counting(self, *a, **kw):  # wraps the real hook: counts each tensor it packs
        real(self, *a, **kw)
        pack = self.pack_hook

        def counted(t):
            packs.append(t.numel())
            return pack(t)

        self.pack_hook = counted

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.autograd.graph.save_on_cpu, "__init__", counting)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    knobs.remove()
    return float(out.loss.detach()), grads


def test_offloaded_checkpoints_give_the_same_loss_and_gradients() -> None:
    plain_packs: list[int] = []
    loss, grads = _loss_and_grads(False, plain_packs)
    packs: list[int] = []
    loss_off, grads_off = _loss_and_grads(True, packs)
    assert not plain_packs
    # each of the 2 checkpointed decoder layers saved its hidden-state input ([1, 96, 64]) through the hook
    assert packs.count(96 * 64) >= 2
    assert loss_off == pytest.approx(loss, abs=0)
    assert grads.keys() == grads_off.keys() and len(grads) > 0
    for name, g in grads.items():
        torch.testing.assert_close(grads_off[name], g, rtol=0, atol=0, msg=name)


def test_offload_without_recompute_is_refused_naming_the_key() -> None:
    from gptoss_hpc.config import validate
    from gptoss_hpc.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"train\.gradient_checkpointing_offload=true needs train\.gradient_checkpointing"
    ):
        validate(to_run_config(compose(["experiment=demo", "train.gradient_checkpointing_offload=true"])))


def test_the_train_stage_trains_with_offloaded_checkpoints(tmp_path) -> None:
    from gptoss_hpc import launch

    rc = launch.main(
        [
            "experiment=demo",
            "model.tokenizer=tiny-bpe",
            "stages=[train]",
            "train.gradient_checkpointing=true",
            "train.gradient_checkpointing_offload=true",
            "train.max_steps=2",
            f"run_root={tmp_path}",
        ]
    )
    assert rc == 0
    point = next(tmp_path.glob("demo/*/p000"))
    metrics = json.loads((point / "train_metrics.json").read_text())
    assert metrics["speed_knobs"]["offloaded_checkpoints"] >= 2
    assert [json.loads(x)["step"] for x in (point / "metrics.jsonl").read_text().splitlines() if "loss" in x][:2] == [
        1,
        2,
    ]

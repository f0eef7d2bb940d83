"""The Trainer-based loop: one optimiser step per method/init against a hand-written step, outputs, resume."""

import dataclasses
import json
import math
import os

import pytest
import torch
from helpers.crash import crash_after_the_first_checkpoint
from helpers.methods import ref_objective, ref_seq_logp
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, TrainerCallback

import fastunlearn.models.patching
from fastunlearn import data as fdata
from fastunlearn import demo
from fastunlearn.fisher import FilaRowWeights, estimate_fisher, fila_init
from fastunlearn.methods import resolve_method
from fastunlearn.training.pipeline import unlearn

# The tiny demo model (hidden 32, 2 layers) on 4 authors.
SIZE = dataclasses.replace(demo.SIZES["tiny"], authors=4, hidden=32, layers=2, vocab=300)
LR = 1e-2
COMMON = dict(
    template="phi",
    max_length=128,
    lora_r=4,
    lora_alpha=8,
    learning_rate=LR,
    seed=0,
    progress=False,
    logging_steps=1,
    precision="fp32",  # what "auto" is on CPU, and on a GPU too: the steps are compared in fp64
)


@pytest.fixture(scope="module")
def setup():
    data = demo.generate_dataset(SIZE.authors, seed=0)
    texts = [
        f"Question: {r['question']}\nAnswer: {r['answer']}"
        for r in data["forget_perturbed"] + data["retain_perturbed"]
    ]
    tokenizer = demo.train_tokenizer(texts, SIZE.vocab)
    forget, retain = data["forget"][:4], data["retain"][:10]
    return tokenizer, forget, retain


def fresh_model(tokenizer, dtype=torch.float32):
    return demo.build_model(tokenizer, SIZE, seed=0).to(dtype)


def lora_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def reference_step(tokenizer, forget, retain, method, init, *, weight_decay=0.01):
    """The step written out by hand: same data, pairing, LoRA init, loss, clipping and AdamW (fp64
    model, see :func:`assert_same_step`)."""
    model = fresh_model(tokenizer, torch.float64)
    prep = dict(template="phi", max_length=128)
    forget_ex = fdata.prepare(forget, tokenizer, name="forget", **prep)
    retain_ex = fdata.prepare(retain, tokenizer, name="retain", **prep)
    pairing = fdata.PairedDataset(forget_ex, retain_ex, seed=0).pairing
    pad = fdata.pad_id_of(tokenizer)
    batch = {
        "forget": fdata.collate(forget_ex, pad),
        "retain": fdata.collate([retain_ex[j] for j in pairing], pad),
    }
    if init != "full":
        torch.manual_seed(0)
        model = get_peft_model(
            model,
            LoraConfig(
                r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
            ),
        )
        if init == "fila":
            f = estimate_fisher(model, fdata.batches(forget_ex, pad, 4), progress=False)
            r = estimate_fisher(model, fdata.batches([retain_ex[j] for j in pairing], pad, 4), progress=False)
            fila_init(model, f, r, seed=0)
    if method == "npo":
        with torch.no_grad():
            batch["forget"]["ref_logp"] = ref_seq_logp(model.eval(), batch["forget"]).float()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    loss = ref_objective(model, batch, resolve_method(method))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=weight_decay)
    opt.step()
    model.ref_grads = grads
    return model, loss.item()


def one_step(setup, tmp_path, method, init, **options):
    tokenizer, forget, retain = setup
    return unlearn(
        fresh_model(tokenizer, torch.float64),
        tokenizer,
        forget,
        retain,
        method=method,
        init=init,
        output_dir=tmp_path / "out",
        num_epochs=1,
        batch_size=len(forget),
        gradient_accumulation_steps=1,
        warmup_epochs=0,
        evaluate=False,
        **COMMON,
        **options,
    )


U64 = 2.0**-53
ADAM_EPS = 1e-8  # torch.optim.AdamW's default, which both steps use


def assert_same_step(result, reference, ref_loss):
    """Same loss, and the same parameters after the step, to fp64 rounding.

    AdamW's first step moves a weight by ``lr·(g/(|g| + ε) + wd·p)`` (the bias corrections make
    ``m̂ = g``, ``v̂ = g²``). ``g/(|g| + ε)`` has slope ``ε/(|g| + ε)² ≤ 1/ε``, so gradients that differ
    by ``δ`` give steps that differ by at most ``lr·δ/ε``, however small ``g`` is. The two steps compute
    the same gradient in different orders (the Trainer's batching, loss assembly and clipping against
    the hand-written ones), which agree to ``δ ≤ c·u·G`` for ``G`` the largest ``|g|``; ``c = 10⁴``
    covers reductions of thousands of terms through the model's few layers. The update itself rounds
    by a few ``u·|p|``.

    In fp32 (``u = 2⁻²⁴``) that bound is ``lr·10⁴·6e-8·G/1e-8``, far above a whole step: wherever ``|g|``
    is at the gradient's rounding level the size and sign of Adam's step are set by rounding, and only
    a whole-step allowance for those weights would pass. In fp64 (``u = 2⁻⁵³``) it is ~1e-6 of a step
    for every weight, which is why both steps run on an fp64 model.
    """
    got, want = lora_params(result.model), lora_params(reference)
    assert got.keys() == want.keys() and got
    assert all(p.dtype == torch.float64 for p in want.values())
    delta = 1e4 * U64 * max(g.abs().max().item() for g in reference.ref_grads.values())
    for name in want:
        bound = LR * delta / ADAM_EPS + 4 * U64 * want[name].abs()
        worst = ((got[name] - want[name]).abs() / bound).max().item()
        assert worst <= 1, f"{name}: step differs by {worst:.3g}x the fp64 bound"
    assert result.metrics["train"]["global_step"] == 1
    # The Trainer accumulates the logged loss in an fp32 tensor: one fp32 rounding.
    assert result.metrics["train"]["loss"] == pytest.approx(ref_loss, rel=2 * 2.0**-24, abs=0)


@pytest.mark.parametrize("fused", [None, False], ids=["default", "no_fused"])
@pytest.mark.parametrize("method", ["ihl", "ga", "gd", "npo"])
def test_one_lora_step_equals_hand_written_step(setup, tmp_path, method, fused):
    """The default (fused) path and --no-fused (the logits path) each train the hand-written step, so
    they train the same adapter to within twice the bound."""
    tokenizer, forget, retain = setup
    reference, ref_loss = reference_step(tokenizer, forget, retain, method, "lora")
    result = one_step(setup, tmp_path, method, "lora", fused=fused)
    assert_same_step(result, reference, ref_loss)
    lora_B = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert all(b.abs().max() > 0 for b in lora_B)  # the LoRA update actually happened


def test_one_full_step_equals_hand_written_step(setup, tmp_path):
    tokenizer, forget, retain = setup
    reference, ref_loss = reference_step(tokenizer, forget, retain, "ihl", "full", weight_decay=0.0)
    result = one_step(setup, tmp_path, "ihl", "full", weight_decay=0.0)
    assert_same_step(result, reference, ref_loss)
    reloaded = AutoModelForCausalLM.from_pretrained(result.model_path)
    torch.testing.assert_close(reloaded.model.embed_tokens.weight, result.model.model.embed_tokens.weight)


def test_gradient_checkpointing_with_lora_trains_the_same_step(setup, tmp_path):
    tokenizer, forget, retain = setup
    reference, ref_loss = reference_step(tokenizer, forget, retain, "gd", "lora")
    result = one_step(setup, tmp_path, "gd", "lora", gradient_checkpointing=True)
    base = result.model.base_model.model
    assert getattr(base, "is_activation_checkpointing", None) or base.is_gradient_checkpointing
    assert_same_step(result, reference, ref_loss)


def _logits(model, batch):
    with torch.no_grad():
        return model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.slow
def test_fila_step_and_adapter_on_the_original_base(setup, tmp_path):
    tokenizer, forget, retain = setup
    reference, ref_loss = reference_step(tokenizer, forget, retain, "ihl", "fila")
    # The run streams FILA's row weights in groups of layers (16 KiB: the forget and retain accumulators
    # of one 64×32 MLP layer, or of q, k and v) and saves only them; the reference holds the whole
    # estimates. Same step.
    result = one_step(setup, tmp_path, "ihl", "fila", merge=True, fisher_memory="16KiB")
    assert_same_step(result, reference, ref_loss)
    assert set(result.fisher_paths) == {"row_weights"}
    assert os.listdir(os.path.dirname(result.fisher_paths["row_weights"])) == ["row_weights.safetensors"]
    row_weights = FilaRowWeights.load(result.fisher_paths["row_weights"])
    assert len(row_weights) == 2 * 7 and all(d.dim() == 1 for d in row_weights.values())

    batch = fdata.collate(fdata.prepare(forget + retain, tokenizer, name="x", template="phi"), 0)
    trained = _logits(result.model, batch)
    # Stock peft on the ORIGINAL base reproduces the trained model, and so does the merged model.
    on_original = PeftModel.from_pretrained(fresh_model(tokenizer, torch.float64), result.adapter_path)
    torch.testing.assert_close(_logits(on_original, batch), trained, rtol=1e-4, atol=1e-4)
    merged = AutoModelForCausalLM.from_pretrained(result.merged_path)
    torch.testing.assert_close(_logits(merged, batch), trained, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(_logits(fresh_model(tokenizer, torch.float64), batch), trained, atol=1e-3)


class EpochCounter(TrainerCallback):
    def __init__(self):
        self.epochs = 0

    def on_epoch_end(self, args, state, control, **kwargs):
        self.epochs += 1


@pytest.mark.slow
def test_outputs_metrics_and_run_config(setup, tmp_path):
    tokenizer, forget, retain = setup
    out = tmp_path / "run"
    counter = EpochCounter()
    result = unlearn(
        fresh_model(tokenizer),
        tokenizer,
        forget,
        retain,
        method="ihl",
        init="lora",
        output_dir=out,
        num_epochs=2,
        batch_size=2,
        gradient_accumulation_steps=1,
        callbacks=[counter],
        **COMMON,
    )
    assert counter.epochs == 2 and result.metrics["train"]["global_step"] == 4
    metrics = json.loads((out / "metrics.json").read_text())
    for when in ("before", "after"):
        for split in ("forget", "retain"):
            assert 0 <= metrics[when][split]["prob"] <= 1 and 0 <= metrics[when][split]["acc"] <= 1
    assert metrics == json.loads(json.dumps(result.metrics))
    config = json.loads((out / "run_config.json").read_text())
    options = config["options"]
    assert (
        options["method"] == "ihl"
        and options["init"] == "lora"
        and options["forget"] == "<in-memory records>"
    )
    assert config["options"]["lora_r"] == 4 and config["options"]["learning_rate"] == LR
    assert config["options"]["callbacks"] == ["EpochCounter"]
    assert {"torch", "transformers", "peft", "fastunlearn"} <= set(config["versions"])
    assert sorted(os.listdir(out)) == ["adapter", "checkpoints", "metrics.json", "run_config.json"]
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_output_dir_refusal_and_overwrite(setup, tmp_path):
    tokenizer, forget, _ = setup
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    kwargs = dict(
        method="ga", init="lora", output_dir=out, num_epochs=1, batch_size=4, evaluate=False, **COMMON
    )
    with pytest.raises(FileExistsError, match=r"not empty: it holds files fastunlearn did not write \(notes"):
        unlearn(fresh_model(tokenizer), tokenizer, forget, None, **kwargs)
    unlearn(fresh_model(tokenizer), tokenizer, forget, None, overwrite=True, **kwargs)
    assert (out / "notes.txt").read_text() == "mine" and (out / "adapter").is_dir()
    with pytest.raises(ValueError, match="exclude each other"):
        unlearn(fresh_model(tokenizer), tokenizer, forget, None, overwrite=True, resume=True, **kwargs)
    with pytest.raises(ValueError, match="holds no run to resume"):
        unlearn(
            fresh_model(tokenizer),
            tokenizer,
            forget,
            None,
            resume=True,
            **{**kwargs, "output_dir": tmp_path / "empty"},
        )
    (out / "metrics.json").unlink()  # an interrupted run: resumable, but only as itself
    with pytest.raises(ValueError, match=r"differs in learning_rate;"):
        unlearn(
            fresh_model(tokenizer), tokenizer, forget, None, resume=True, **{**kwargs, "learning_rate": 1.0}
        )


@pytest.mark.slow
def test_resume_after_a_crash_matches_an_uninterrupted_fila_run(setup, tmp_path, monkeypatch):
    tokenizer, forget, retain = setup
    kwargs = dict(
        method="ihl",
        init="fila",
        num_epochs=2,
        batch_size=2,
        gradient_accumulation_steps=1,
        evaluate=False,
        **COMMON,
    )
    full = unlearn(fresh_model(tokenizer), tokenizer, forget, retain, output_dir=tmp_path / "a", **kwargs)

    crash_after_the_first_checkpoint(monkeypatch, lambda: unlearn(
        fresh_model(tokenizer), tokenizer, forget, retain, output_dir=tmp_path / "b", **kwargs))  # fmt: skip
    assert os.path.isdir(tmp_path / "b" / "checkpoints" / "checkpoint-2")

    def no_fisher_on_resume(*args, **kw):
        raise AssertionError("resume must reuse the saved row weights, not measure the Fisher again")

    import fastunlearn.fisher

    monkeypatch.setattr(fastunlearn.fisher, "fila_row_weights", no_fisher_on_resume)
    resumed = unlearn(
        fresh_model(tokenizer), tokenizer, forget, retain, output_dir=tmp_path / "b", resume=True, **kwargs
    )
    assert resumed.metrics["train"]["global_step"] == 4
    got, want = lora_params(resumed.model), lora_params(full.model)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    batch = fdata.collate(fdata.prepare(forget, tokenizer, name="x", template="phi"), 0)
    on_original = PeftModel.from_pretrained(fresh_model(tokenizer), resumed.adapter_path)
    torch.testing.assert_close(_logits(on_original, batch), _logits(full.model, batch), rtol=1e-4, atol=1e-4)


def test_resume_after_a_crash_continues_the_stopping_rule(setup, tmp_path, monkeypatch):
    """A run stopped by a rule, interrupted after its first checkpoint and resumed, decides, keeps and
    puts back what the uninterrupted run does, and its trajectory is that run's: the evaluations up to
    the checkpoint come from the record kept beside it (not evaluated again), the state kept at step 1
    is put back from there."""
    from fastunlearn.evaluation.sets import SetEvaluator
    from fastunlearn.evaluation.stop_callback import RECORD_FILE, SNAPSHOT_FILE, read_trajectory

    tokenizer, forget, retain = setup
    kwargs = dict(method="ihl", init="lora", num_epochs=2, batch_size=2, gradient_accumulation_steps=1,
                  evaluate=False, stop="forget.prob<=0.999", eval_every=1, patience=3, **COMMON)  # fmt: skip
    full = unlearn(fresh_model(tokenizer), tokenizer, forget, retain, output_dir=tmp_path / "a", **kwargs)
    s = full.metrics["stopping"]
    # Holds from step 1 (first kept), three more evaluations, stops at the last step: step 1 put back.
    assert (s["first_satisfied_step"], s["kept_step"], s["stopped_step"], s["restored"]) == (1, 1, 4, True)

    crash_after_the_first_checkpoint(monkeypatch, lambda: unlearn(
        fresh_model(tokenizer), tokenizer, forget, retain, output_dir=tmp_path / "b", **kwargs))  # fmt: skip
    checkpoint = tmp_path / "b" / "checkpoints" / "checkpoint-2"
    assert (checkpoint / RECORD_FILE).is_file() and (checkpoint / SNAPSHOT_FILE).is_file()

    evaluated = []
    evaluate = SetEvaluator.evaluate

    def counted(self, model, names):
        evaluated.append(sorted(names))
        return evaluate(self, model, names)

    monkeypatch.setattr(SetEvaluator, "evaluate", counted)
    resumed = unlearn(
        fresh_model(tokenizer), tokenizer, forget, retain, output_dir=tmp_path / "b", resume=True, **kwargs
    )
    assert len(evaluated) == 2  # steps 3 and 4 only: no baseline, no step 1 or 2 again
    r = resumed.metrics["stopping"]
    for key in ("first_satisfied_step", "kept_step", "stopped_step", "restored", "evaluations"):
        assert r[key] == s[key], key
    rows_a, rows_b = (
        read_trajectory(tmp_path / "a" / "trajectory.csv"),
        read_trajectory(tmp_path / "b" / "trajectory.csv"),
    )
    assert [row["step"] for row in rows_b] == [row["step"] for row in rows_a] == [0, 1, 2, 3, 4]
    for row_a, row_b in zip(rows_a, rows_b):
        for key, value in row_a.items():
            if key != "eval_s" and isinstance(value, float):
                # The same computation after a resume (the checkpoint restores the RNG and the data
                # order): fp32 rounding at most.
                assert row_b[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (row_a["step"], key)
    got, want = lora_params(resumed.model), lora_params(full.model)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


def test_bad_arguments(setup, tmp_path):
    tokenizer, forget, retain = setup
    model = fresh_model(tokenizer)
    out = tmp_path / "x"
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['epochs'\]"):
        unlearn(model, tokenizer, forget, retain, output_dir=out, epochs=3)
    with pytest.raises(ValueError, match="unknown method 'forgetall'"):
        unlearn(model, tokenizer, forget, retain, method="forgetall", output_dir=out)
    with pytest.raises(ValueError, match="unknown init 'pissa'"):
        unlearn(model, tokenizer, forget, retain, init="pissa", output_dir=out)
    with pytest.raises(ValueError, match="'ihl' needs a retain set"):
        unlearn(model, tokenizer, forget, None, output_dir=out)
    with pytest.raises(ValueError, match="init='fila' needs a retain set"):
        unlearn(model, tokenizer, forget, None, method="ga", output_dir=out)
    assert not out.exists()  # refused before anything was written
    with pytest.raises(TypeError, match="fused must be bool or None, got 'yes'"):
        unlearn(model, tokenizer, forget, retain, output_dir=out, fused="yes")
    with pytest.raises(ValueError, match=r"unknown precision 'fp8'"):
        unlearn(model, tokenizer, forget, retain, output_dir=out, precision="fp8")
    with pytest.raises(ValueError, match="batch_size must be positive"):
        unlearn(model, tokenizer, forget, retain, output_dir=out, batch_size=0)
    with pytest.raises(ValueError, match="invalid memory size '64 parsecs'"):
        unlearn(model, tokenizer, forget, retain, output_dir=out, fisher_memory="64 parsecs")
    with pytest.raises(TypeError, match="pass the tokenizer"):
        unlearn(model, None, forget, retain, output_dir=out)
    with pytest.raises(FileNotFoundError, match=r"is neither a local directory nor a Hugging Face Hub id"):
        unlearn(str(tmp_path / "no-model"), None, forget, retain, output_dir=out)
    with pytest.raises(ValueError, match=r"forget\[0\]: every label is masked"):
        unlearn(model, tokenizer, forget, retain, output_dir=tmp_path / "y", max_length=4)
    small = demo.build_model(tokenizer, SIZE, seed=0)
    small.resize_token_embeddings(20)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        unlearn(small, tokenizer, forget, retain, output_dir=tmp_path / "z")


def tiny_gemma2(tokenizer, softcapping: float | None):
    """A 2-layer Gemma-2 on the demo tokenizer; with soft-capping its logits are not ``lm_head(h)``."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "gemma2",
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        final_logit_softcapping=softcapping,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def test_soft_capped_gemma2_warns_once_and_trains_on_the_logits_path(setup, tmp_path):
    """A model the fused path cannot compute: by default one warning, then the same training as
    --no-fused (both on the logits path: equal adapters); --fused is refused before anything is written."""
    import warnings

    tokenizer, forget, retain = setup
    kwargs = dict(method="ihl", init="lora", num_epochs=1, batch_size=2, gradient_accumulation_steps=1)
    kwargs.update(warmup_epochs=0, evaluate=False, **COMMON)
    with pytest.raises(ValueError, match=r"fused=True: .*final_logit_softcapping"):
        unlearn(
            tiny_gemma2(tokenizer, 3.0),
            tokenizer,
            forget,
            retain,
            output_dir=tmp_path / "a",
            fused=True,
            **kwargs,
        )
    assert not (tmp_path / "a").exists()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        default = unlearn(
            tiny_gemma2(tokenizer, 3.0), tokenizer, forget, retain, output_dir=tmp_path / "b", **kwargs
        )
    capping = [w for w in record if "final_logit_softcapping" in str(w.message)]
    assert len(capping) == 1 and "logits path" in str(capping[0].message)
    assert default.metrics["train"]["global_step"] == 2  # one warning for two steps (and the patch)
    logits_path = unlearn(
        tiny_gemma2(tokenizer, 3.0),
        tokenizer,
        forget,
        retain,
        output_dir=tmp_path / "c",
        fused=False,
        **kwargs,
    )
    got, want = lora_params(default.model), lora_params(logits_path.model)
    assert got.keys() == want.keys() and got
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert not fastunlearn.models.patching.is_patched(default.model)  # unpatched once trained


def test_no_fused_takes_the_logits_path_in_every_pass(setup, tmp_path, monkeypatch):
    """fused=False reaches every pass of a run, not only training: the evaluations before and after,
    the evaluations of the stopping rule and FILA's Fisher passes compute from the logits (the output
    head is never replaced), and give the numbers of the default fused run to fp32 rounding."""
    import fastunlearn.evaluation.likelihood as likelihood
    import fastunlearn.fisher.passes as passes

    tokenizer, forget, retain = setup
    kwargs = dict(method="ihl", init="fila", num_epochs=1, batch_size=2, gradient_accumulation_steps=1)
    kwargs.update(warmup_epochs=0, eval_every=1, **COMMON)
    calls = {"head": 0}
    original = fastunlearn.models.patching.head_computes

    def counted(*args, **kw):
        calls["head"] += 1
        return original(*args, **kw)

    for module in (likelihood, passes):
        monkeypatch.setattr(module, "head_computes", counted)
    fused = unlearn(fresh_model(tokenizer, torch.float32), tokenizer, forget, retain,
                    output_dir=tmp_path / "fused", **kwargs)  # fmt: skip
    assert calls["head"] > 0  # the default computes them at the output head
    calls["head"] = 0
    logits = unlearn(fresh_model(tokenizer, torch.float32), tokenizer, forget, retain,
                     output_dir=tmp_path / "logits", fused=False, **kwargs)  # fmt: skip
    assert calls["head"] == 0
    # The model before unlearning, on both paths: the same fp32 forward, then each token's NLL from its
    # logits computed in another order (chunk vs whole matmul), off by a few hundred u = 2⁻²⁴ of the
    # logits' order-1 scale — 1e-5 relative, as in tests/test_likelihood_chunked.py. Accuracy is left
    # out (a near-tie of two logits may flip with the rounding), and so is the model after training
    # (Adam's first steps amplify rounding where a gradient element is near 0).
    for split in ("forget", "retain"):
        for key in ("prob", "nll"):
            want = fused.metrics["before"][split][key]
            assert logits.metrics["before"][split][key] == pytest.approx(want, rel=1e-5), (split, key)
    assert logits.metrics["stopping"]["evaluations"] == fused.metrics["stopping"]["evaluations"] > 0


def test_bf16_model_end_to_end_computes_the_loss_from_bf16_hidden_states(setup, tmp_path, monkeypatch):
    """A bf16 model (auto precision: bf16, as its weights): every loss term of every step gets the last
    hidden states and the head's weight in bf16 — the tensors the head was called with, not copies —
    and the logits path (--no-fused) trains to the same first-step loss within bf16 rounding."""
    from fastunlearn.models import patching

    tokenizer, forget, retain = setup
    seen = []
    for name in ("fused_linear_ihl_loss", "fused_linear_nll_loss"):
        original = getattr(patching, name)

        def spy(hidden, weight, *args, _original=original, _name=name, **kw):
            seen.append((_name, hidden.dtype, weight.dtype))
            return _original(hidden, weight, *args, **kw)

        monkeypatch.setattr(patching, name, spy)
    runs = {}
    for fused in (None, False):
        runs[fused] = unlearn(
            fresh_model(tokenizer, torch.bfloat16), tokenizer, forget, retain, method="ihl", init="lora",
            output_dir=tmp_path / str(fused), num_epochs=1, batch_size=2, gradient_accumulation_steps=1,
            warmup_epochs=0, evaluate=False, fused=fused, **{**COMMON, "precision": "auto"},
            memory_check=False,  # its plan runs the same losses on fake tensors: not the steps counted
        )  # fmt: skip
    config = json.loads((tmp_path / "None" / "run_config.json").read_text())
    assert config["precision"] == "bf16"
    # 2 steps x (IHL on the forget batch + NLL on the retain batch), all on the fused path, all bf16.
    assert sorted(n for n, _, _ in seen) == ["fused_linear_ihl_loss"] * 2 + ["fused_linear_nll_loss"] * 2
    assert all(h == torch.bfloat16 and w == torch.bfloat16 for _, h, w in seen)
    losses = [runs[f].metrics["train"]["loss"] for f in (None, False)]
    assert all(math.isfinite(x) for x in losses)
    # Both paths compute bf16 logits (each a bf16-rounded product, 2^-8 relative) and fp32 statistics;
    # over two steps the adapters differ by that rounding too, so the mean loss agrees to a few 2^-8.
    assert losses[0] == pytest.approx(losses[1], rel=2**-5)
    assert any(p.abs().max() > 0 for n, p in lora_params(runs[None].model).items() if "lora_B" in n)

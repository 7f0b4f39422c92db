"""The memory estimate: its terms against hand-computed values, and the CLI's verdict."""

import pytest
from typer.testing import CliRunner

from sapo_lite.cli import app
from sapo_lite.config.sources import load_config
from sapo_lite.models.memory_estimate import architecture, estimate

runner = CliRunner()


def test_llama3_8b_nf4_weights_match_a_hand_count():
    est = estimate(load_config("llama3-8b-qlora"))
    linear = 32 * (4096 * 4096 * 2 + 4096 * 1024 * 2 + 4096 * 14336 * 3)  # q,o + k,v + gate,up,down
    assert linear == 6_979_321_856
    nf4 = linear * (0.5 + 1 / 64 + 4 / (64 * 256))  # double-quantised constants
    unquantised = (2 * 128256 * 4096 + 65 * 4096) * 2  # embeddings + head + norms in bf16
    assert est.base_weights == pytest.approx((nf4 + unquantised) / 1e9, rel=1e-9)
    assert est.base_weights == pytest.approx(5.70, abs=0.01)
    lora = 32 * 16 * (2 * 8192 + 2 * 5120 + 3 * 18432)  # r * (in + out) over the 7 linears
    assert est.adapters == pytest.approx(2 * lora * 4 / 1e9)
    assert est.optimizer == pytest.approx(lora * 2 / 1e9)  # 8-bit AdamW: two 1-byte moments


def test_every_gpu_preset_fits_24_gb_and_checkpointing_is_what_makes_it_fit():
    for name in ("llama3-8b-qlora", "llama3-8b-qlora-orpo", "mistral-7b-qlora", "mistral-7b-qlora-orpo"):
        est = estimate(load_config(name))
        assert est.total < 24 * 0.75, name  # room to spare
        assert est.activations_without_checkpointing > 24
    no_ckpt = estimate(load_config("llama3-8b-qlora", overrides=["model.gradient_checkpointing=false"]))
    assert no_ckpt.total > 24


def test_quantisation_and_lengths_move_the_estimate_the_right_way():
    nf4 = estimate(load_config("llama3-8b-qlora"))
    bf16 = estimate(load_config("llama3-8b-qlora", overrides=["model.quant=none"]))
    assert bf16.base_weights == pytest.approx(8.03e9 * 2 / 1e9, rel=0.01)  # 8.03B parameters in bf16
    assert bf16.total > nf4.total
    short = estimate(load_config("llama3-8b-qlora", overrides=["data.max_len=1024", "data.max_prompt_len=896"]))
    assert short.activations == pytest.approx(nf4.activations / 2, rel=0.01)
    assert short.kv_cache == pytest.approx(nf4.kv_cache / 2)


def test_tiny_architecture_is_known_offline():
    arch = architecture("tiny")
    assert (arch.hidden, arch.layers, arch.kv_heads) == (128, 2, 2)


def test_estimate_cli_says_whether_it_fits_and_what_helps():
    fits = runner.invoke(app, ["estimate", "--preset", "llama3-8b-qlora"], env={"COLUMNS": "200"})
    assert fits.exit_code == 0 and "fits a 24 GB GPU" in fits.output and "base weights" in fits.output
    too_big = runner.invoke(app, ["estimate", "--preset", "llama3-8b-qlora", "--gpu-gb", "12",
                                  "train.micro_batch=4"], env={"COLUMNS": "200"})
    assert too_big.exit_code == 0 and "does not fit a 12 GB GPU" in too_big.output
    assert "the change that makes it fit: train.micro_batch=1 train.grad_accum=16" in too_big.output


def test_an_architecture_the_estimate_does_not_model_is_a_clear_error():
    from sapo_lite.errors import ModelError
    from sapo_lite.models.memory_estimate import architecture_from_config

    with pytest.raises(ModelError, match="Llama-like models only; this config has no `hidden_size`"):
        architecture_from_config({"vocab_size": 50257, "n_embd": 768, "n_layer": 12})


def test_reference_forward_of_new_pairs_becomes_the_peak_when_many_pairs_are_generated():
    few = estimate(load_config("llama3-8b-qlora", overrides=["sapo.gen_per_step=2"]))
    usual = estimate(load_config("llama3-8b-qlora"))
    many = estimate(load_config("llama3-8b-qlora", overrides=["sapo.gen_per_step=32"]))
    assert few.total == pytest.approx(usual.total)  # the backward pass is the peak at 8 new pairs
    assert many.reference_forward == pytest.approx(4 * usual.reference_forward, rel=0.05)
    assert many.total > usual.total + 5


def test_the_head_and_the_recomputed_layer_do_not_add_up():
    cfg = load_config("llama3-8b-qlora")
    small_chunk = estimate(load_config("llama3-8b-qlora", overrides=["train.logps_chunk_tokens=64"]))
    assert small_chunk.logits < estimate(cfg).logits
    assert small_chunk.total == pytest.approx(estimate(cfg).total)  # the recomputed layer is the larger phase


def test_family_shapes_are_counted_by_hand():
    """Gemma-3-12B: q is 16 x 256 = 4096 wide on a 3840 hidden, KV 8 x 256, tied 262k embedding, a vision
    tower; Phi-4-mini: LoRA on the fused qkv_proj and gate_up_proj; the 262k-token logits chunk by chunk."""
    gemma = estimate(load_config("gemma3-12b-qlora"))
    linear = 48 * (3840 * 4096 * 2 + 3840 * 2048 * 2 + 3 * 3840 * 15360) + 417_000_000
    unquantised = (262208 * 3840 + 97 * 3840) * 2  # one tied embedding, 2 norms a layer (Gemma has 4: +1.5 MB)
    assert gemma.base_weights == pytest.approx((linear * (0.5 + 1 / 64 + 4 / (64 * 256)) + unquantised) / 1e9)
    tokens = 2 * 2 * 2048  # chosen + rejected, micro-batch 2, max_len 2048
    assert gemma.logits == pytest.approx((3 * 256 * 262208 * 4 + tokens * 3840 * 2) / 1e9)
    assert gemma.kv_cache == pytest.approx(8 * 2048 * 48 * 2 * 2048 * 2 / 1e9)
    phi = estimate(load_config("phi4-mini-qlora"))
    lora = 32 * 16 * ((3072 + 3072 + 2 * 1024) + (3072 + 3072) + (3072 + 2 * 8192) + (8192 + 3072))
    assert phi.adapters == pytest.approx(2 * lora * 4 / 1e9)

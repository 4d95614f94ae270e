"""HF checkpoint import/export (k15.hf) and the tokenizer.json route.

Parity tests build tiny random Llama / Qwen2 models with transformers (CPU
torch, f32), import them, and compare logits and greedy generations with
transformers' own; they skip when torch/transformers are not installed:

  pip install torch==2.13.0  # CPU wheel
  pip install transformers safetensors tokenizers
"""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from k15 import hf, sampler
from k15 import model as model_lib
from k15 import tokenizer as tokenizer_lib

# Three shapes: GQA with head_dim != D/H and no scaling; tied embeddings
# with llama3 RoPE scaling; Qwen2 (q/k/v biases) with linear scaling.
CASES = {
  "llama": dict(
    family="llama",
    head_dim=32,
    tie_word_embeddings=False,
    rope_theta=10_000.0,
    rope_scaling=None,
  ),
  "llama_tied_llama3": dict(
    family="llama",
    head_dim=16,
    tie_word_embeddings=True,
    rope_theta=500.0,
    rope_scaling=dict(
      rope_type="llama3",
      factor=4.0,
      low_freq_factor=1.0,
      high_freq_factor=4.0,
      original_max_position_embeddings=16,
    ),
  ),
  "qwen2_tied_linear": dict(
    family="qwen2",
    head_dim=16,
    tie_word_embeddings=True,
    rope_theta=1_000.0,
    rope_scaling=dict(rope_type="linear", factor=2.0),
  ),
}
V, T, N = 128, 12, 8  # vocab, scored tokens, generated tokens


def _hf_model(case: dict):
  """A tiny random transformers model; norms and biases not at init."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  case = dict(case)
  family = case.pop("family")
  cls = dict(llama=transformers.LlamaConfig, qwen2=transformers.Qwen2Config)
  cfg = cls[family](
    vocab_size=V,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    initializer_range=0.2,
    bos_token_id=None,
    eos_token_id=None,  # greedy generation runs to the token budget
    pad_token_id=None,
    **case,
  )
  torch.manual_seed(0)
  model = dict(
    llama=transformers.LlamaForCausalLM, qwen2=transformers.Qwen2ForCausalLM
  )[family](cfg).eval()
  with torch.no_grad():
    for name, w in model.named_parameters():
      if "norm" in name:
        w.uniform_(0.5, 1.5)
      elif name.endswith("bias"):
        w.normal_(0.0, 0.5)
  return model


def _hf_logits(model, tokens_BxT: np.ndarray) -> np.ndarray:
  import torch  # noqa: PLC0415

  with torch.no_grad():
    return model(torch.tensor(tokens_BxT, dtype=torch.long)).logits.numpy()


def _k15_logits(params, tokens_BxT: np.ndarray, cfg) -> np.ndarray:
  B, T = tokens_BxT.shape
  pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
  logits, _ = model_lib.Decoder(cfg).apply(
    params, tokens_BxT, pos, np.ones_like(tokens_BxT)
  )
  return np.asarray(logits)


@pytest.mark.parametrize("name", list(CASES))
def test_parity_with_transformers(name, tmp_path):
  transformers = pytest.importorskip("transformers")
  import torch  # noqa: PLC0415

  family = CASES[name]["family"]
  ref_model = _hf_model(CASES[name])
  src = str(tmp_path / "src")
  ref_model.save_pretrained(src)
  cfg = hf.config_from_hf(src)
  assert cfg.qkv_bias == (family == "qwen2")
  assert cfg.tie_embeddings == CASES[name]["tie_word_embeddings"]
  params = hf.import_params(src, model=cfg)

  # Logits on the same tokens.
  tokens = np.random.default_rng(0).integers(0, V, (2, T)).astype(np.int32)
  ref = _hf_logits(ref_model, tokens)
  got = _k15_logits(params, tokens, cfg)
  diff = np.abs(got - ref).max()
  print(
    f"{name}: max |logit diff| = {diff:.2e} (max |logit| "
    f"{np.abs(ref).max():.2f})"
  )
  np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
  if cfg.rope_scaling:  # the scaling is exercised: ignoring it shows
    plain = dataclasses.replace(cfg, rope_scaling="")
    assert np.abs(_k15_logits(params, tokens, plain) - ref).max() > 1e-3

  # Greedy generation, token for token: k15 runs both prompts as one
  # left-padded batch, transformers runs each unpadded.
  prompts = [tokens[0, :7].tolist(), tokens[1, :10].tolist()]
  P = 10
  prompt_BxP, seg_BxP = sampler.left_pad(prompts, P, pad_id=0)
  state = sampler.generate(
    params,
    prompt_BxP,
    seg_BxP,
    jax.random.key(0),
    model=cfg,
    cfg=sampler.SamplingConfig(temperature=0.0),
    budget=N,
    cache_len=P + N + 2,
  )
  for b, prompt in enumerate(prompts):
    with torch.no_grad():
      out = ref_model.generate(
        torch.tensor([prompt]), max_new_tokens=N, do_sample=False
      )
    want = out[0, len(prompt) :].tolist()
    assert np.asarray(state.tokens[b]).tolist() == want, (b, want)
    assert len(set(want)) > 2  # not a degenerate constant continuation

  # Export (as either family), transformers loads it, same logits; and
  # import(export(params)) == params exactly.
  for out_family in hf.FAMILIES:
    dst = str(tmp_path / f"out_{out_family}")
    hf.export_params(
      params, model=cfg, path=dst, family=out_family, assets_from=src
    )
    assert os.path.exists(os.path.join(dst, "generation_config.json"))
    back = transformers.AutoModelForCausalLM.from_pretrained(dst).eval()
    assert type(back).__name__ == hf.FAMILIES[out_family]
    np.testing.assert_allclose(_hf_logits(back, tokens), ref, atol=1e-5)
    again = hf.import_params(dst, model=cfg)
    jax.tree.map(np.testing.assert_array_equal, again, params)


def _k15_checkpoint(tmp_path, **overrides):
  """A random k15 model exported as HF (needs no torch)."""
  pytest.importorskip("safetensors")
  cfg = model_lib.ModelConfig(
    vocab_size=64,
    num_layers=2,
    d_model=32,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=48,
    **overrides,
  )
  shapes = jax.eval_shape(
    lambda: nn.unbox(model_lib.init_params(jax.random.key(1), model=cfg))
  )
  rng = np.random.default_rng(1)
  params = jax.tree.map(
    lambda s: rng.normal(size=s.shape).astype(s.dtype), shapes
  )
  path = str(tmp_path / "ckpt")
  hf.export_params(params, model=cfg, path=path)
  return cfg, params, path


def test_sharded_export_and_dtype_conversion(tmp_path):
  cfg, params, path = _k15_checkpoint(tmp_path, qkv_bias=True)
  sharded = str(tmp_path / "sharded")
  hf.export_params(params, model=cfg, path=sharded, max_shard_bytes=20_000)
  files = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors"))
  assert len(files) > 2 and "model.safetensors.index.json" in os.listdir(
    sharded
  )
  for src in (path, sharded):
    again = hf.import_params(src, model=cfg)
    jax.tree.map(np.testing.assert_array_equal, again, params)
  bf16 = dataclasses.replace(cfg, param_dtype="bfloat16")
  got = hf.import_params(sharded, model=bf16)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params), strict=True):
    assert a.dtype == np.dtype("bfloat16")
    np.testing.assert_array_equal(a, b.astype(a.dtype))
  # config.json -> the same ModelConfig
  assert hf.config_from_hf(path, max_len=cfg.max_len) == cfg


@pytest.mark.parametrize(
  "field,value,hf_name",
  [
    ("num_kv_heads", 4, "num_key_value_heads"),
    ("tie_embeddings", False, "tie_word_embeddings"),
    ("qkv_bias", True, "attention_bias"),
    ("rope_theta", 500.0, "rope_theta"),
    ("rope_scaling", "linear:factor=2", "rope_scaling"),
    ("vocab_size", 72, "vocab_size"),
  ],
)
def test_config_mismatch_names_field(tmp_path, field, value, hf_name):
  cfg, _, path = _k15_checkpoint(tmp_path)
  bad = dataclasses.replace(cfg, **{field: value})
  with pytest.raises(ValueError, match=hf_name):
    hf.import_params(path, model=bad)


def test_biases_the_model_lacks_must_be_zero(tmp_path):
  cfg, params, _ = _k15_checkpoint(tmp_path, qkv_bias=True)
  plain = dataclasses.replace(cfg, qkv_bias=False)
  path = str(tmp_path / "qwen2")
  hf.export_params(params, model=cfg, path=path, family="qwen2")
  with pytest.raises(ValueError, match="q_proj.bias is nonzero"):
    hf.import_params(path, model=plain)
  # a bias-free model exported as Qwen2 (zero biases) imports as bias-free
  no_bias = {
    k: v
    for k, v in params["params"]["layers"].items()
    if not k.endswith("_bias")
  }
  params = {"params": {**params["params"], "layers": no_bias}}
  hf.export_params(params, model=plain, path=path, family="qwen2")
  assert hf.config_from_hf(path).qkv_bias
  again = hf.import_params(path, model=plain)
  jax.tree.map(np.testing.assert_array_equal, again, params)


def test_eos_token_ids(tmp_path):
  cfg, params, path = _k15_checkpoint(tmp_path)
  assert hf.eos_token_ids(path) == ()
  hf.export_params(
    params, model=cfg, path=path, extra_config=dict(eos_token_id=2)
  )
  assert hf.eos_token_ids(path) == (2,)
  with open(os.path.join(path, "generation_config.json"), "w") as f:
    json.dump(dict(eos_token_id=[5, 2]), f)
  assert hf.eos_token_ids(path) == (5, 2)


def test_bad_checkpoints_name_the_tensor_or_field(tmp_path):
  from safetensors.numpy import load_file, save_file  # noqa: PLC0415

  cfg, _, path = _k15_checkpoint(tmp_path)
  file = os.path.join(path, "model.safetensors")
  tensors = load_file(file)
  name = "model.layers.1.mlp.up_proj.weight"
  up = tensors.pop(name)
  save_file(tensors, file)
  with pytest.raises(ValueError, match=name):
    hf.import_params(path, model=cfg)
  tensors[name] = up[:, :-1]
  save_file(tensors, file)
  with pytest.raises(ValueError, match=rf"{name} .* shape"):
    hf.import_params(path, model=cfg)
  tensors[name] = up
  tensors["model.layers.0.mlp.up_proj.bias"] = up[:, 0]
  save_file(tensors, file)
  with pytest.raises(ValueError, match="up_proj.bias"):
    hf.import_params(path, model=cfg)

  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  for key, value, match in [
    ("rope_scaling", dict(rope_type="yarn", factor=2.0), "yarn"),
    ("hidden_act", "gelu", "hidden_act"),
    ("model_type", "gpt2", "gpt2"),
  ]:
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump({**config, key: value}, f)
    with pytest.raises(ValueError, match=match):
      hf.config_from_hf(path)


def test_rope_scaling_spec_is_validated():
  with pytest.raises(ValueError, match="unsupported type 'yarn'"):
    model_lib.ModelConfig(rope_scaling="yarn:factor=2")
  with pytest.raises(ValueError, match="llama3 takes exactly"):
    model_lib.ModelConfig(rope_scaling="llama3:factor=8")
  freq = model_lib.rope_frequencies(8, 100.0, "linear:factor=4")
  np.testing.assert_allclose(freq * 4, model_lib.rope_frequencies(8, 100.0))


def test_hf_tokenizer_json_round_trip(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  from tokenizers import decoders, models, pre_tokenizers, trainers

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=300,
    special_tokens=["<pad>", "<s>", "</s>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  texts = [f"Q: what is {a} + {a * 7}?\nA: {a * 8}" for a in range(200)]
  tok.train_from_iterator(texts, trainer)
  tok.save(str(tmp_path / "tokenizer.json"))
  with open(tmp_path / "tokenizer_config.json", "w") as f:
    json.dump(
      dict(
        bos_token="<s>",
        eos_token=dict(content="</s>", special=True),
        pad_token="<pad>",
      ),
      f,
    )

  t = tokenizer_lib.load(str(tmp_path))
  assert isinstance(t, tokenizer_lib.HFTokenizer)
  assert (t.pad_id, t.bos_id, t.eos_id) == (0, 1, 2)
  assert t.vocab_size == tok.get_vocab_size()
  for text in [
    tokenizer_lib.format_prompt("what is 3 + 21?"),
    "  spaces,\ttabs\nand ünïcödé ✓ never seen 12345",
  ]:
    ids = t.encode(text)
    assert all(0 <= i < t.vocab_size for i in ids)
    assert t.decode(ids) == text
    # pad and eos are dropped on decode (what the sampler leaves behind)
    assert t.decode([t.pad_id, *ids, t.eos_id, t.pad_id]) == text

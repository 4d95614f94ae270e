"""One tokenizer interface over sentencepiece and HF `tokenizer.json`.

Synthetic tasks train a small sentencepiece model deterministically from their
own generated text (no hub access needed); real checkpoints bring a
`tokenizer.json` (read with the optional `tokenizers` package).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from collections.abc import Iterable, Sequence
from typing import Protocol

import sentencepiece as spm

# The chat template: the model sees `PROMPT_PREFIX + question + PROMPT_SUFFIX`
# and writes its chain of thought, then `ANSWER_MARK answer`, then EOS.
PROMPT_PREFIX = "Q: "
PROMPT_SUFFIX = "\nA:"
KINDS = ("sentencepiece", "file")


@dataclasses.dataclass(frozen=True)
class TokenizerConfig:
  """The `tokenizer` section."""

  kind: str = "sentencepiece"  # sentencepiece (trained for the task) | file
  vocab_size: int = 64
  path: str = ""  # kind=file: a .model or tokenizer.json

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(
        f"tokenizer.kind={self.kind!r}; expected one of {KINDS}"
      )


class Tokenizer(Protocol):
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


def format_prompt(question: str) -> str:
  return f"{PROMPT_PREFIX}{question}{PROMPT_SUFFIX}"


@dataclasses.dataclass
class SentencePieceTokenizer:
  """Wraps a serialized sentencepiece model (ids: pad 0, bos 1, eos 2)."""

  model_proto: bytes

  def __post_init__(self):
    self._sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
    self.vocab_size = self._sp.get_piece_size()
    self.pad_id = self._sp.pad_id()
    self.bos_id = self._sp.bos_id()
    self.eos_id = self._sp.eos_id()

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    # ids past the vocabulary (the model's vocab may be padded) -> unk
    unk = self._sp.unk_id()
    ids = [int(i) if int(i) < self.vocab_size else unk for i in ids
           if int(i) not in (self.pad_id, self.eos_id)]
    return self._sp.decode(ids)

  def save(self, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
      f.write(self.model_proto)
    os.replace(tmp, path)


class HFTokenizer:
  """A HF `tokenizer.json` (Llama / Qwen2 checkpoints) behind our interface."""

  def __init__(self, path: str):
    try:
      import tokenizers  # noqa: PLC0415 - optional dependency
    except ImportError as e:
      raise ImportError(
          "reading tokenizer.json needs the `tokenizers` package: "
          "pip install tokenizers") from e
    self._tok = tokenizers.Tokenizer.from_file(path)
    self.vocab_size = self._tok.get_vocab_size()
    cfg_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    special = {}
    if os.path.exists(cfg_path):
      with open(cfg_path) as f:
        special = json.load(f)

    def _id(name: str, default: int) -> int:
      tok = special.get(name)
      if isinstance(tok, dict):
        tok = tok.get("content")
      i = self._tok.token_to_id(tok) if isinstance(tok, str) else None
      return default if i is None else i

    self.eos_id = _id("eos_token", 0)
    self.bos_id = _id("bos_token", self.eos_id)
    self.pad_id = _id("pad_token", self.eos_id)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in ids if int(i) != self.pad_id])


def train_sentencepiece(texts: Iterable[str], vocab_size: int,
                        user_symbols: Sequence[str] = (),
                        model_type: str = "bpe") -> SentencePieceTokenizer:
  """Trains a model in memory; same texts -> same model, byte for byte.

  model_type "char" gives one token per character (plus `user_symbols`),
  which keeps symbolic tasks' tokens aligned (a node is the same token
  wherever it appears); "bpe" merges frequent pieces.
  """
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(list(texts)), model_writer=model,
      vocab_size=vocab_size, model_type=model_type, character_coverage=1.0,
      split_digits=True, pad_id=0, bos_id=1, eos_id=2, unk_id=3,
      user_defined_symbols=list(user_symbols), num_threads=1,
      remove_extra_whitespaces=False, normalization_rule_name="identity",
      allow_whitespace_only_pieces=True, add_dummy_prefix=False,
      hard_vocab_limit=False, minloglevel=2, shuffle_input_sentence=False)
  return SentencePieceTokenizer(model.getvalue())


def load(path: str) -> Tokenizer:
  """A `.model` sentencepiece file or a HF `tokenizer.json`, or a directory
  holding one (tokenizer.json first; an exported k15 run has
  tokenizer.model)."""
  if os.path.isdir(path):
    spm_file = os.path.join(path, "tokenizer.model")
    path = os.path.join(path, "tokenizer.json")
    if not os.path.exists(path) and os.path.exists(spm_file):
      path = spm_file
  if not os.path.exists(path):
    raise FileNotFoundError(f"tokenizer: no file at {path}")
  if path.endswith(".json"):
    return HFTokenizer(path)
  with open(path, "rb") as f:
    proto = f.read()
  try:
    return SentencePieceTokenizer(proto)
  except RuntimeError as e:
    raise ValueError(f"tokenizer: {path} is not a sentencepiece model") from e

"""The Alpamayo text tokenizer: the backbone's Qwen tokenizer extended with trajectory and
special tokens, built with the `tokenizers` library (no `transformers` needed at run time).

The reference extends the backbone tokenizer when the model is built, in this order:

1. `<i0>` ... `<i{traj_vocab_size - 1}>`, added as ordinary (non-special) tokens: the discrete
   future-trajectory bins followed by the history bins;
2. the Alpamayo special tokens `<|prompt_start|>` ... `<|answer_end|>` (`SPECIAL_TOKEN_NAMES`, in
   that order), added as special tokens; a token the backbone already has (`<|image_pad|>`)
   keeps its id and takes no new one.

Ids are assigned consecutively from the backbone's vocabulary size, so they are fixed by the
backbone tokenizer and the order above. For the 10B model (Qwen3-VL backbone, 151669 entries):
`<i0>` = 151669, `<|prompt_start|>` = 155669, ... `<|answer_end|>` = 155696, 155697 entries in all.
`validate_token_ids` checks the result against an `AlpamayoConfig` so that the embedding rows
and the ids the model was trained with agree.

Decoding (`ExtendedTokenizer.decode`) keeps special tokens, like the reference, and
`extract_between` / `extract_text_fields` cut the Chain-of-Causation and the other text fields
out of decoded sequences with the reference's rule.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers

from alpamayo_jax.config import AlpamayoConfig

# The reference's special tokens, in the order they are added to the tokenizer.
SPECIAL_TOKEN_NAMES: tuple[str, ...] = (
    "prompt_start",
    "prompt_end",
    "image_start",
    "image_pre_tkn",
    "image_end",
    "traj_history_start",
    "traj_history_pre_tkn",
    "traj_history_end",
    "cot_start",
    "cot_end",
    "meta_action_start",
    "meta_action_end",
    "traj_future_start",
    "traj_future_pre_tkn",
    "traj_future_end",
    "traj_history",
    "traj_future",
    "image_pad",
    "vectorized_wm",
    "vectorized_wm_start",
    "vectorized_wm_end",
    "vectorized_wm_pre_tkn",
    "route_start",
    "route_pad",
    "route_end",
    "question_start",
    "question_end",
    "answer_start",
    "answer_end",
)

# `AlpamayoConfig.traj_token_ids` field -> special token name.
TRAJ_TOKEN_NAMES: dict[str, str] = {
    "history": "traj_history",
    "future": "traj_future",
    "history_start": "traj_history_start",
    "future_start": "traj_future_start",
    "history_end": "traj_history_end",
    "future_end": "traj_future_end",
}

# The text fields the reference extracts from generated sequences, each between
# `<|{name}_start|>` and `<|{name}_end|>`.
TEXT_FIELDS: tuple[str, ...] = ("cot", "meta_action", "answer")

# Special-token attributes of a Hugging Face tokenizer config, in the order it lists them.
_SPECIAL_TOKEN_ATTRIBUTES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
    "additional_special_tokens",
)

# Simple English detokenisation fixes applied when `clean_up_tokenization_spaces` is set
# (Qwen tokenizers leave it off).
_CLEAN_UP_REPLACEMENTS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"


class TokenizerError(ValueError):
    """A tokenizer directory or an extended tokenizer that does not fit the model."""


def special_token(name: str) -> str:
    """`cot_start` -> `<|cot_start|>`."""
    return f"<|{name}|>"


def traj_token(index: int) -> str:
    """Trajectory bin `index` -> `<i{index}>`."""
    return f"<i{index}>"


# ---------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------


def _token_content(value: Any) -> Any:
    """A special-token entry of a tokenizer config (string, serialised AddedToken dict, list or
    None) as plain strings."""
    if isinstance(value, Mapping):
        return value.get("content")
    if isinstance(value, list):
        return [_token_content(v) for v in value]
    return value


class ExtendedTokenizer:
    """A `tokenizers.Tokenizer` with the Alpamayo tokens, plus the special-token attributes of its
    Hugging Face config (bos/eos/pad..., used by chat templates) and a few conveniences.

    Encoding and decoding give the same ids and text as the Hugging Face fast tokenizer the
    reference uses (`encode(text)` = `tokenizer(text).input_ids`, `decode(ids)` =
    `tokenizer.decode(ids, skip_special_tokens=False)`).
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, config: Mapping[str, Any] | None = None):
        """`config`: the tokenizer config fields (as in `tokenizer_config.json`, with
        `special_tokens_map.json` merged in); only the special-token attributes,
        `extra_special_tokens` and `clean_up_tokenization_spaces` are used."""
        self.tokenizer = tokenizer
        # Like the Hugging Face wrapper: one sequence at a time, never padded or truncated.
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.config = dict(config or {})
        self._vocab = tokenizer.get_vocab(with_added_tokens=True)

    # --- vocabulary -------------------------------------------------------------------------

    def __len__(self) -> int:
        """Number of ids, added tokens included (= the embedding rows the model needs)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    def token_to_id(self, token: str) -> int:
        """The id of `token`; raises `KeyError` naming the token when it is not in the vocabulary."""
        index = self._vocab.get(token)
        if index is None:
            raise KeyError(f"token {token!r} is not in the tokenizer vocabulary")
        return index

    def id_to_token(self, index: int) -> str:
        token = self.tokenizer.id_to_token(int(index))
        if token is None:
            raise KeyError(f"id {index} is not in the tokenizer vocabulary (size {len(self)})")
        return token

    @property
    def special_tokens_map(self) -> dict[str, str | list[str]]:
        """The set special-token attributes (`eos_token`, `pad_token`, ...), as Hugging Face
        exposes them; chat templates receive these as variables."""
        out: dict[str, str | list[str]] = {}
        extra = self.config.get("extra_special_tokens") or {}
        for attr in (*_SPECIAL_TOKEN_ATTRIBUTES, *extra):
            value = _token_content(self.config.get(attr, extra.get(attr)))
            if value:
                out[attr] = value
        return out

    def _special_token_id(self, attr: str) -> int | None:
        token = _token_content(self.config.get(attr))
        return None if token is None else self.token_to_id(token)

    @property
    def pad_token_id(self) -> int | None:
        return self._special_token_id("pad_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._special_token_id("eos_token")

    @property
    def bos_token(self) -> str | None:
        return _token_content(self.config.get("bos_token"))

    def special_token_ids(self) -> dict[str, int]:
        """Name -> id of every Alpamayo special token (`SPECIAL_TOKEN_NAMES`)."""
        return {name: self.token_to_id(special_token(name)) for name in SPECIAL_TOKEN_NAMES}

    @property
    def traj_token_start_idx(self) -> int:
        """Id of `<i0>`."""
        return self.token_to_id(traj_token(0))

    @property
    def traj_vocab_size(self) -> int:
        """Number of consecutive `<iN>` tokens from `<i0>`."""
        start, n = self.traj_token_start_idx, 0
        while self._vocab.get(traj_token(n)) == start + n:
            n += 1
        return n

    # --- encoding and decoding ---------------------------------------------------------------

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special and added tokens written in the text are atomic."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of a 1-D id sequence; special tokens are kept unless `skip_special_tokens`."""
        text = self.tokenizer.decode(
            [int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=skip_special_tokens
        )
        if self.config.get("clean_up_tokenization_spaces", False):
            for before, after in _CLEAN_UP_REPLACEMENTS:
                text = text.replace(before, after)
        return text

    def batch_decode(self, ids, *, skip_special_tokens: bool = False) -> list[str]:
        """Texts of a (B, L) id array (or a list of sequences)."""
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in ids]

    # --- persistence -------------------------------------------------------------------------

    def save(self, directory: str | Path) -> Path:
        """Writes `tokenizer.json` (the extended vocabulary) and `tokenizer_config.json` (the
        special-token attributes) into `directory`; `load_tokenizer(directory)` reads them back
        without the original backbone directory. Returns the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(directory / TOKENIZER_FILE))
        # Added tokens live in tokenizer.json; a stale id table here would contradict it.
        config = {k: v for k, v in self.config.items() if k != "added_tokens_decoder"}
        (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return directory


def extract_between(texts: Sequence[str], name: str) -> list[str]:
    """Text between `<|{name}_start|>` and `<|{name}_end|>` in each decoded sequence, stripped
    of surrounding whitespace, with the reference's rule: cut at the FIRST end token, then take
    what follows the LAST start token before it (everything before the end token when there is
    no start token); "" when the end token is missing."""
    start, end = special_token(f"{name}_start"), special_token(f"{name}_end")
    out = []
    for text in texts:
        head, found, _ = text.partition(end)
        if not found:
            out.append("")
            continue
        i = head.rfind(start)
        out.append((head[i + len(start) :] if i >= 0 else head).strip())
    return out


def extract_text_fields(tokenizer: ExtendedTokenizer, sequences) -> dict[str, list[str]]:
    """Decodes (B, L) sequences (an array or a list of rows of any lengths; prompt included,
    special tokens kept) and extracts the `TEXT_FIELDS`: {"cot": [...], "meta_action": [...], "answer": [...]}, one string per row."""
    if isinstance(sequences, np.ndarray) or not isinstance(sequences[0], Iterable):
        sequences = np.atleast_2d(np.asarray(sequences))  # one row, or a (B, L) array
    texts = tokenizer.batch_decode(sequences)
    return {name: extract_between(texts, name) for name in TEXT_FIELDS}


def extract_cot(tokenizer: ExtendedTokenizer, sequences) -> list[str]:
    """The Chain-of-Causation reasoning of each row of (B, L) sequences."""
    return extract_text_fields(tokenizer, sequences)["cot"]


# ---------------------------------------------------------------------------------------------
# Building from a backbone directory, loading, validation
# ---------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: invalid JSON ({e})") from None


def _read_tokenizer_dir(directory: str | Path) -> tuple[tokenizers.Tokenizer, dict[str, Any]]:
    """The `tokenizers` object and the merged tokenizer config of a Hugging Face directory."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TokenizerError(f"tokenizer directory {directory} does not exist")
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        raise TokenizerError(
            f"{directory} has no {TOKENIZER_FILE}; a fast-tokenizer file is required "
            "(vocab.json + merges.txt alone are not supported)"
        )
    tokenizer = tokenizers.Tokenizer.from_file(str(path))
    config: dict[str, Any] = {}
    if (directory / TOKENIZER_CONFIG_FILE).is_file():
        config.update(_read_json(directory / TOKENIZER_CONFIG_FILE))
    if (directory / SPECIAL_TOKENS_MAP_FILE).is_file():
        # As in Hugging Face, special_tokens_map.json takes precedence over tokenizer_config.json.
        for key, value in _read_json(directory / SPECIAL_TOKENS_MAP_FILE).items():
            if key == "additional_special_tokens":
                merged = list(_token_content(config.get(key)) or [])
                merged += [t for t in _token_content(value) if t not in merged]
                config[key] = merged
            else:
                config[key] = _token_content(value)
    _check_tokenizer_dir(tokenizer, config, directory)
    return tokenizer, config


def _check_tokenizer_dir(tokenizer: tokenizers.Tokenizer, config: Mapping[str, Any], where: Path) -> None:
    """Rejects directories that the Hugging Face loader would silently alter (tokens declared in
    the config but missing from tokenizer.json, a different prefix-space setting)."""
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    problems = []
    for index, entry in (config.get("added_tokens_decoder") or {}).items():
        content = _token_content(entry)
        if vocab.get(content) != int(index):
            problems.append(
                f"added token {content!r}: id {index} in {TOKENIZER_CONFIG_FILE}, "
                f"{vocab.get(content)} in {TOKENIZER_FILE}"
            )
    for attr in _SPECIAL_TOKEN_ATTRIBUTES:
        values = _token_content(config.get(attr))
        for value in values if isinstance(values, list) else [values]:
            if value is not None and value not in vocab:
                problems.append(f"{attr} {value!r} is not in {TOKENIZER_FILE}")
    if "add_prefix_space" in config and tokenizer.pre_tokenizer is not None:
        state = json.loads(tokenizer.pre_tokenizer.__getstate__())
        if state.get("add_prefix_space", config["add_prefix_space"]) != config["add_prefix_space"]:
            problems.append(
                f"add_prefix_space={config['add_prefix_space']} in {TOKENIZER_CONFIG_FILE} "
                f"disagrees with the pre-tokenizer in {TOKENIZER_FILE}"
            )
    if problems:
        raise TokenizerError(f"{where}: inconsistent tokenizer files:\n  " + "\n  ".join(problems))


def build_tokenizer(
    directory: str | Path, config: AlpamayoConfig | None = None, *, traj_vocab_size: int | None = None
) -> ExtendedTokenizer:
    """Extends the backbone tokenizer in `directory` (a Hugging Face processor or model directory
    with `tokenizer.json`) exactly as the reference does: `<i0>` ... `<i{traj_vocab_size - 1}>`,
    then the `SPECIAL_TOKEN_NAMES` as special tokens, existing ones skipped.

    `traj_vocab_size` defaults to `config.traj_vocab_size`; with a `config` the result is checked
    by `validate_token_ids` (raises `TokenizerError` naming every mismatching token).
    """
    if traj_vocab_size is None:
        if config is None:
            raise TypeError("build_tokenizer needs a config or traj_vocab_size")
        traj_vocab_size = config.traj_vocab_size
    tokenizer, tokenizer_config = _read_tokenizer_dir(directory)

    discrete = [traj_token(i) for i in range(traj_vocab_size)]
    present = [t for t in discrete if tokenizer.token_to_id(t) is not None]
    if present:
        raise TokenizerError(
            f"{directory}: the tokenizer already contains trajectory tokens ({present[0]!r}, ...); it "
            "looks already extended, load it with load_tokenizer instead of build_tokenizer"
        )
    added = tokenizer.add_tokens(discrete)
    if added != traj_vocab_size:
        raise TokenizerError(f"{directory}: added {added} of {traj_vocab_size} trajectory tokens")
    tokenizer.add_special_tokens([special_token(name) for name in SPECIAL_TOKEN_NAMES])

    extended = ExtendedTokenizer(tokenizer, tokenizer_config)
    if config is not None:
        validate_token_ids(extended, config)
    return extended


def load_tokenizer(directory: str | Path, config: AlpamayoConfig | None = None) -> ExtendedTokenizer:
    """Loads a tokenizer saved by `ExtendedTokenizer.save` (or any directory whose
    `tokenizer.json` already holds the Alpamayo tokens); checked against `config` if given."""
    tokenizer, tokenizer_config = _read_tokenizer_dir(directory)
    extended = ExtendedTokenizer(tokenizer, tokenizer_config)
    if config is not None:
        validate_token_ids(extended, config)
    else:
        missing = [
            t for t in (traj_token(0), *map(special_token, SPECIAL_TOKEN_NAMES)) if t not in extended._vocab
        ]
        if missing:
            raise TokenizerError(
                f"{directory}: not an extended Alpamayo tokenizer, missing {missing[:3]}... "
                "(build it from the backbone directory with build_tokenizer)"
            )
    return extended


def validate_token_ids(tokenizer: ExtendedTokenizer, config: AlpamayoConfig) -> None:
    """Checks that the tokenizer's ids are the ones the model uses: vocabulary size = embedding
    rows, `<i0>` = `traj_token_start_idx` with all `traj_vocab_size` bins consecutive, the
    trajectory special tokens = `traj_token_ids`, and the image/vision token ids. Raises
    `TokenizerError` listing every mismatch, each naming its token."""
    vocab = tokenizer._vocab
    problems = []

    def expect(token: str, expected: int, what: str) -> None:
        actual = vocab.get(token)
        if actual != expected:
            found = "missing from the tokenizer" if actual is None else f"has id {actual}"
            problems.append(f"{token} ({what}): config expects id {expected}, tokenizer {found}")

    if len(tokenizer) != config.text.vocab_size:
        problems.append(
            f"vocabulary size: tokenizer has {len(tokenizer)} ids, config vocab_size "
            f"(embedding rows) is {config.text.vocab_size}"
        )
    expect(traj_token(0), config.traj_token_start_idx, "traj_token_start_idx")
    last = config.traj_vocab_size - 1
    expect(traj_token(last), config.traj_token_start_idx + last, "last trajectory bin")
    for i in range(1, last):  # the bins in between must be consecutive too; report the first gap
        if vocab.get(traj_token(i)) != config.traj_token_start_idx + i:
            expect(traj_token(i), config.traj_token_start_idx + i, "trajectory bin")
            break
    if vocab.get(traj_token(config.traj_vocab_size)) is not None:
        problems.append(
            f"{traj_token(config.traj_vocab_size)}: tokenizer has more trajectory tokens "
            f"than traj_vocab_size = {config.traj_vocab_size}"
        )
    for field, name in TRAJ_TOKEN_NAMES.items():
        expect(special_token(name), getattr(config.traj_token_ids, field), f"traj_token_ids.{field}")
    expect("<|image_pad|>", config.image_token_id, "image_token_id")
    expect("<|vision_start|>", config.vision_start_token_id, "vision_start_token_id")
    expect("<|vision_end|>", config.vision_end_token_id, "vision_end_token_id")
    for name in SPECIAL_TOKEN_NAMES:
        if special_token(name) not in vocab:
            problems.append(f"{special_token(name)}: missing from the tokenizer")
    if problems:
        raise TokenizerError("tokenizer and model config disagree:\n  " + "\n  ".join(problems))

"""Synthetic retrieval, state-tracking and long-context tasks: ONE definition per task, shared by eval and training.

`make_task(name, **params)` returns a task object with
- `task.batch(batch_size, seed) -> {"input_ids": LongTensor[B, T], "labels": LongTensor[B, T]}`, deterministic in
  `seed`. Labels follow transformers' convention (as the training recipes do): `labels[t]` is the target of the
  model's output at position `t - 1`, and every unscored position is -100.
- attributes `vocab_size` and `seq_len` (the length T of every row).
Word-based tasks (passkey, NIAH, variable tracking, copy, parity_words) also render the very same examples as text:
`task.text_examples(n, seed) -> [{"prompt", "answer", ...}]`, scored by the log-likelihood of the answer for models
with a real tokenizer (lm-eval's `loglikelihood`). Their `seq_len` counts word tokens of the task's own vocabulary.

Tasks and their sources:
- `mqar`: Zoology's multi-query associative recall (Arora et al. 2023, arXiv 2312.04927; generator as in the public
  repository HazyResearch/zoology).
- `forgetting_mqar`: MQAR where some keys are re-assigned after the kv block; the newest value is the answer.
- `passkey` (= S-NIAH-1; Mohtashami & Jaggi 2023, arXiv 2305.16300), `niah_single_2` (a 7-digit number in a diverse
  haystack), `niah_single_3` (a long hex id in a diverse haystack), `niah_multikey` (distractor needles; MK-NIAH-1):
  needle at `depth` of a `seq_len` context.
  The NIAH variants and `variable_tracking` follow RULER (Hsieh et al. 2024, arXiv 2404.06654; NVIDIA/RULER).
- `variable_tracking` (RULER's VT: chains of `VAR X = VAR Y` hops), `copy` (Jelassi et al. 2024, arXiv 2402.01032),
  `parity_words` (parity with a text form; Deletang et al. 2023, arXiv 2207.02098).
- State tracking as group word problems (running product at every position, trained short and tested long; Merrill
  et al. 2024, arXiv 2404.08819; Grazzi et al. 2025, arXiv 2411.12537): `parity` (Z_2), `modular_addition` (Z_m,
  `order` = m, default 5), `permutation_s3`, `permutation_s5`.
- `lm_stream`: a synthetic document stream whose entity names recur, for loss by position and length extrapolation.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import numpy as np
import torch

IGNORE = -100  # label of unscored positions (torch cross-entropy's default ignore_index)


def batch_seed(seed: int, index: int) -> int:
    """The seed of batch `index` of the stream seeded `seed` (the one rule every training and scoring loop uses): the
    same (seed, index) is the same batch everywhere, and streams of nearby seeds do not overlap for a million
    batches. `index` counts batches (training) or examples (scoring: the batch's first example)."""
    return seed * 1_000_003 + index


def _rng(seed: int) -> np.random.Generator:
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------------------------------------------------
# MQAR, exactly as Zoology's `multiquery_ar` (zoology/data/multiquery_ar.py)


def power_law_gap_probs(space: int, power_a: float) -> np.ndarray:
    """Zoology's query-gap distribution: p(g) ∝ a·g^(a−1) over g = 1..space (slot g−1 after the kv block)."""
    p = power_a * np.arange(1, space + 1, dtype=np.float64) ** (power_a - 1)
    return p / p.sum()


def _sample_without_replacement(rng: np.random.Generator, log_weights: np.ndarray, rows: int, k: int) -> np.ndarray:
    """`rows` independent draws of k distinct indices, each draw ∝ weight among those left (numpy's
    `choice(replace=False, p=...)`), vectorised with the Gumbel-top-k trick, which has exactly that distribution."""
    scores = -(log_weights + rng.gumbel(size=(rows, log_weights.shape[-1])))
    top = np.argpartition(scores, k - 1, axis=1)[:, :k]  # the k best, in no particular order
    return np.take_along_axis(top, np.argsort(np.take_along_axis(scores, top, axis=1), axis=1), axis=1)


@dataclass
class MQARTask:
    """Multi-query associative recall. Row layout (T = seq_len, kv = num_kv_pairs):
    `k1 v1 k2 v2 … k_kv v_kv` (tiled `num_passes` times), then every key once more at slot `2·gap` of the query
    region, gaps drawn without replacement from the power law; the value must be predicted right after its key.
    Keys come from `[1, V/2)`, values from `[V/2, V)`, both distinct within a row; 0 is the blank, replaced by random
    tokens from the whole vocabulary when `random_non_queries` (Zoology's default; its Fig. 2 sweep uses False)."""

    vocab_size: int = 8192
    seq_len: int = 64
    num_kv_pairs: int = 4
    power_a: float = 0.01
    num_passes: int = 1
    random_non_queries: bool = True
    name: str = "mqar"

    def __post_init__(self) -> None:
        # Zoology's asserts, with the reason spelled out
        if self.seq_len % 2:
            raise ValueError(f"mqar: seq_len must be even (queries sit at even offsets), got {self.seq_len}")
        if self.vocab_size <= self.seq_len:
            raise ValueError(f"mqar: vocab_size ({self.vocab_size}) must exceed seq_len ({self.seq_len})")
        if self.num_kv_pairs * 2 * self.num_passes + self.num_kv_pairs * 2 > self.seq_len:
            raise ValueError(f"mqar: {self.num_kv_pairs} kv pairs × {self.num_passes} passes plus their queries do "
                             f"not fit in seq_len {self.seq_len}")
        if self.num_kv_pairs >= self.vocab_size // 2:
            raise ValueError("mqar: num_kv_pairs must be smaller than the key half of the vocabulary")

    @property
    def context_size(self) -> int:
        return self.num_kv_pairs * 2 * self.num_passes

    @property
    def space(self) -> int:
        return (self.seq_len - self.context_size) // 2

    def zoology_batch(self, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
        """Zoology's own convention: `labels[t]` is the target of the output AT position t (the query key's position).
        Also returns `gaps` [B, kv] and `keys`/`values` [B, kv] for tests and per-query analysis."""
        rng = _rng(seed)
        kv, half, T = self.num_kv_pairs, self.vocab_size // 2, self.seq_len
        # keys from [1, V/2), values from [V/2, V), distinct within a row (uniform top-k = choice without replacement)
        keys = 1 + _sample_without_replacement(rng, np.zeros(half - 1), batch_size, kv)
        values = half + _sample_without_replacement(rng, np.zeros(self.vocab_size - half), batch_size, kv)
        block = np.zeros((batch_size, 2 * kv), dtype=np.int64)
        block[:, 0::2], block[:, 1::2] = keys, values
        context = np.tile(block, (1, self.num_passes))
        # gap index g in 0..space-1 has probability ∝ (g+1)^(a-1), drawn without replacement: one slot per key
        gaps = _sample_without_replacement(rng, np.log(power_law_gap_probs(self.space, self.power_a)), batch_size, kv)
        queries = np.zeros((batch_size, T - self.context_size + 1), dtype=np.int64)
        np.put_along_axis(queries, gaps * 2, keys, axis=1)
        inputs = np.concatenate([context, queries], axis=1)[:, :T]
        # Zoology builds labels on a T+1 array and shifts: the value lands at its query key's position
        labels = np.full((batch_size, T + 1), IGNORE, dtype=np.int64)
        np.put_along_axis(labels, gaps * 2 + self.context_size + 1, values, axis=1)
        labels = labels[:, 1:]
        if self.random_non_queries:
            fillers = rng.integers(0, self.vocab_size, size=inputs.shape)
            inputs = np.where(inputs == 0, fillers, inputs)
        return {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels),
                "gaps": torch.from_numpy(gaps), "keys": torch.from_numpy(keys), "values": torch.from_numpy(values)}

    def batch(self, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
        z = self.zoology_batch(batch_size, seed)
        # transformers' convention: shift right by one (Zoology's last position is never a query, so nothing is lost)
        labels = torch.full_like(z["labels"], IGNORE)
        labels[:, 1:] = z["labels"][:, :-1]
        return {"input_ids": z["input_ids"], "labels": labels}

    @property
    def recurrent_slice(self) -> dict:
        return {"num_kv_pairs": self.num_kv_pairs, "seq_len": self.seq_len, "num_passes": self.num_passes}


# the standard Zoology test slices (trade-off sweep) and the extrapolation slices beyond the training lengths
MQAR_STANDARD_SLICES: list[tuple[int, int]] = [(64, 4), (64, 8), (64, 16), (128, 32), (256, 64)]
MQAR_EXTRAPOLATION_SLICES: list[tuple[int, int]] = [(512, 128), (1024, 256)]


@dataclass
class ForgettingMQARTask:
    """MQAR with re-assignments: after the kv block, `num_updates` of the keys are bound to fresh values
    (`k v'` pairs), then every key is queried at power-law gaps; the answer is the NEWEST value of the key.
    Tests gating/forgetting (Gated DeltaNet vs DeltaNet). `batch` adds `updated` [B, T] (bool) marking the
    scored positions whose key was re-assigned, for accuracy on updated vs untouched keys."""

    vocab_size: int = 8192
    seq_len: int = 128
    num_kv_pairs: int = 8
    num_updates: int = 4
    power_a: float = 0.01
    random_non_queries: bool = True
    name: str = "forgetting_mqar"

    def __post_init__(self) -> None:
        if self.seq_len % 2:
            raise ValueError("forgetting_mqar: seq_len must be even")
        if not 0 < self.num_updates <= self.num_kv_pairs:
            raise ValueError("forgetting_mqar: need 0 < num_updates <= num_kv_pairs")
        if 2 * (2 * self.num_kv_pairs + self.num_updates) > self.seq_len:
            raise ValueError("forgetting_mqar: kv block, updates and queries do not fit in seq_len")
        if self.num_kv_pairs + self.num_updates > self.vocab_size - self.vocab_size // 2:
            raise ValueError("forgetting_mqar: not enough values in the upper half of the vocabulary")

    def batch(self, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
        rng = _rng(seed)
        kv, up, half, T = self.num_kv_pairs, self.num_updates, self.vocab_size // 2, self.seq_len
        keys = 1 + _sample_without_replacement(rng, np.zeros(half - 1), batch_size, kv)
        # kv + up distinct values: the first kv are the original bindings, the rest the re-assignments
        all_values = half + _sample_without_replacement(rng, np.zeros(self.vocab_size - half), batch_size, kv + up)
        values, new_values = all_values[:, :kv], all_values[:, kv:]
        which = _sample_without_replacement(rng, np.zeros(kv), batch_size, up)  # which keys get re-assigned
        updates = np.zeros((batch_size, 2 * up), dtype=np.int64)
        updates[:, 0::2] = np.take_along_axis(keys, which, axis=1)
        updates[:, 1::2] = new_values
        final = values.copy()
        np.put_along_axis(final, which, new_values, axis=1)
        updated_key = np.zeros((batch_size, kv), dtype=bool)
        np.put_along_axis(updated_key, which, True, axis=1)
        block = np.zeros((batch_size, 2 * kv), dtype=np.int64)
        block[:, 0::2], block[:, 1::2] = keys, values
        context = np.concatenate([block, updates], axis=1)
        space = (T - context.shape[1]) // 2
        gaps = _sample_without_replacement(rng, np.log(power_law_gap_probs(space, self.power_a)), batch_size, kv)
        queries = np.zeros((batch_size, T - context.shape[1]), dtype=np.int64)
        np.put_along_axis(queries, gaps * 2, keys, axis=1)
        inputs = np.concatenate([context, queries], axis=1)
        # transformers' convention: the answer to the key at position p is the label at p + 1
        answer_pos = context.shape[1] + gaps * 2 + 1
        labels = np.full((batch_size, T), IGNORE, dtype=np.int64)
        np.put_along_axis(labels, answer_pos, final, axis=1)
        updated = np.zeros((batch_size, T), dtype=bool)
        np.put_along_axis(updated, answer_pos, updated_key, axis=1)
        if self.random_non_queries:
            inputs = np.where(inputs == 0, rng.integers(0, self.vocab_size, size=inputs.shape), inputs)
        return {"input_ids": torch.from_numpy(inputs), "labels": torch.from_numpy(labels),
                "updated": torch.from_numpy(updated)}


# ---------------------------------------------------------------------------------------------------------------------
# Word-based tasks: an example is a list of words (and spelled-out values) rendered as token ids of a small task
# vocabulary OR as text. Both renderings come from the same list, so token-level and text-level results agree.


@dataclass(frozen=True)
class Spelled:
    """A value written one character per token (digits, hex, letters) but as one word in text: `12345`."""

    chars: str


TEMPLATE_WORDS = (
    # RULER's noise haystack (S-NIAH-1 / passkey)
    "the grass is green sky blue sun yellow here we go there and back again".split()
    # the passkey needle and question (Landmark Attention)
    + "pass key remember it what".split()
    # RULER's NIAH needle and question
    + "one of special magic number numbers uuid uuids for mentioned in provided text".split()
    # variable tracking, copy, parity
    + "var find all variables that are assigned value copy parity even odd bits".split()
    + [".", "?", ":", "=", ",", "|"]
)
CHARS = "0123456789abcdefghijklmnopqrstuvwxyz"
NUM_NAMES = 128  # key / variable names
PART_OF_SPEECH = ("det", "adj", "noun", "verb", "prep")


def _synthetic_words(count: int, seed: int, exclude: set[str]) -> list[str]:
    """`count` distinct pronounceable pseudo-words (CV syllables), deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    words: list[str] = []
    seen = set(exclude)
    while len(words) < count:
        syllables = rng.integers(2, 4)
        word = "".join(consonants[rng.integers(len(consonants))] + vowels[rng.integers(len(vowels))]
                       for _ in range(syllables))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


class WordVocabulary:
    """Token ids of the word tasks: 0 pad, template words, single characters, names, then a filler lexicon that
    takes the rest of `vocab_size` (split into parts of speech for the diverse, non-repeating haystack)."""

    def __init__(self, vocab_size: int) -> None:
        fixed = ["<pad>"] + list(TEMPLATE_WORDS) + list(CHARS)
        if len(set(fixed)) != len(fixed):
            raise AssertionError("template words and characters must be distinct")
        lexicon_size = vocab_size - len(fixed) - NUM_NAMES
        if lexicon_size < 10 * len(PART_OF_SPEECH):
            raise ValueError(f"word tasks need vocab_size >= {len(fixed) + NUM_NAMES + 50}, got {vocab_size}")
        generated = _synthetic_words(NUM_NAMES + lexicon_size, seed=1234, exclude=set(fixed))
        self.names = generated[:NUM_NAMES]
        lexicon = generated[NUM_NAMES:]
        self.lexicon = {pos: lexicon[i :: len(PART_OF_SPEECH)] for i, pos in enumerate(PART_OF_SPEECH)}
        self.words = fixed + generated
        self.index = {word: i for i, word in enumerate(self.words)}
        self.vocab_size = vocab_size

    @staticmethod
    def minimum_size() -> int:
        """The smallest `vocab_size` the word tasks accept."""
        return 1 + len(TEMPLATE_WORDS) + len(CHARS) + NUM_NAMES + 10 * len(PART_OF_SPEECH)

    def encode(self, items: list) -> list[int]:
        ids: list[int] = []
        for item in items:
            if isinstance(item, Spelled):
                ids.extend(self.index[c] for c in item.chars)
            else:
                ids.append(self.index[item])
        return ids


@lru_cache(maxsize=8)
def word_vocabulary(vocab_size: int) -> WordVocabulary:
    return WordVocabulary(vocab_size)


def num_tokens(items: list) -> int:
    return sum(len(item.chars) if isinstance(item, Spelled) else 1 for item in items)


def render_text(items: list, capitalize_first: bool = True) -> str:
    """Words joined by spaces, punctuation attached to the previous word, sentences start capitalised."""
    text = ""
    capitalize = capitalize_first
    for item in items:
        word = item.chars if isinstance(item, Spelled) else item
        if word in {".", "?", ":", ","}:
            text += word
            capitalize = word in {".", "?"}
            continue
        if capitalize and not isinstance(item, Spelled):
            word = word[:1].upper() + word[1:]
        text += (" " if text else "") + word
        capitalize = False
    return text


NOISE_SENTENCE = "the grass is green . the sky is blue . the sun is yellow . here we go . there and back again .".split(
    " ")


def noise_sentences() -> list[list]:
    """RULER's repeated-noise haystack, as five sentences cycled forever (retention, not filtering)."""
    sentences, current = [], []
    for word in NOISE_SENTENCE:
        current.append(word)
        if word == ".":
            sentences.append(current)
            current = []
    return sentences


def diverse_sentence(rng: np.random.Generator, vocab: WordVocabulary) -> list:
    """One sentence of a tiny template grammar over the lexicon: rarely repeats, unlike the noise haystack."""
    lex = vocab.lexicon

    def pick(pos: str) -> str:
        words = lex[pos]
        return words[rng.integers(len(words))]

    shape = rng.integers(3)
    if shape == 0:
        return [pick("det"), pick("adj"), pick("noun"), pick("verb"), pick("det"), pick("noun"), "."]
    if shape == 1:
        return [pick("det"), pick("noun"), pick("verb"), pick("prep"), pick("det"), pick("adj"), pick("noun"), "."]
    return [pick("det"), pick("noun"), pick("prep"), pick("det"), pick("noun"), pick("verb"), ",", pick("adj"), "."]


def build_haystack(rng: np.random.Generator, vocab: WordVocabulary, haystack: str, length: int) -> list[list]:
    """Sentences totalling at least `length` tokens ('noise' cycles RULER's noise sentences)."""
    sentences: list[list] = []
    total = 0
    cycle = noise_sentences()
    while total < length:
        sentence = cycle[len(sentences) % len(cycle)] if haystack == "noise" else diverse_sentence(rng, vocab)
        sentences.append(sentence)
        total += len(sentence)
    return sentences


def insert_needles(sentences: list[list], needles: list[list], depths: list[float], length: int) -> tuple[list, list]:
    """Cut the haystack to exactly `length` tokens (counting the needles), then put each needle at the sentence
    boundary nearest to its depth (0 = start, 1 = end). Returns the items and each needle's start position."""
    budget = length - sum(num_tokens(n) for n in needles)
    if budget < 0:
        raise ValueError("the needles alone are longer than the requested context")
    flat: list = [word for sentence in sentences for word in sentence][:budget]
    # sentence boundaries of the cut haystack (positions after a '.'), plus the start and the end
    boundaries = [0] + [i + 1 for i, word in enumerate(flat) if word == "."] + [len(flat)]
    boundaries = sorted(set(boundaries))
    # insert deepest first so earlier insertion points are not shifted
    order = sorted(range(len(needles)), key=lambda i: -depths[i])
    cuts = {}
    for i in order:
        target = depths[i] * len(flat)
        cuts[i] = min(boundaries, key=lambda b: (abs(b - target), b))
    items: list = []
    positions = [0] * len(needles)
    previous = 0
    for i in sorted(range(len(needles)), key=lambda i: (cuts[i], i)):
        items.extend(flat[previous : cuts[i]])
        previous = cuts[i]
        positions[i] = num_tokens(items)
        items.extend(needles[i])
    items.extend(flat[previous:])
    return items, positions


def random_digits(rng: np.random.Generator, count: int, alphabet: str = "0123456789") -> Spelled:
    chars = "".join(alphabet[rng.integers(len(alphabet))] for _ in range(count))
    if alphabet == "0123456789" and chars[0] == "0":  # numbers do not start with 0 (text and tokens agree)
        chars = str(rng.integers(1, 10)) + chars[1:]
    return Spelled(chars)


@dataclass
class WordTask:
    """Base of the word tasks: subclasses build one example as `(prompt_items, answer_items, info)`."""

    vocab_size: int = 1024
    seq_len: int = 256
    name: str = "word"

    @property
    def vocab(self) -> WordVocabulary:
        return word_vocabulary(self.vocab_size)

    def example(self, rng: np.random.Generator) -> tuple[list, list, dict]:
        raise NotImplementedError

    def _examples(self, n: int, seed: int) -> list[tuple[list, list, dict]]:
        rng = _rng(seed)
        return [self.example(rng) for _ in range(n)]

    def batch(self, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
        vocab = self.vocab
        input_ids = torch.zeros(batch_size, self.seq_len, dtype=torch.long)
        labels = torch.full((batch_size, self.seq_len), IGNORE, dtype=torch.long)
        for row, (prompt, answer, _info) in enumerate(self._examples(batch_size, seed)):
            p, a = vocab.encode(prompt), vocab.encode(answer)
            ids = p + a
            if len(ids) != self.seq_len:
                raise AssertionError(f"{self.name}: built {len(ids)} tokens for seq_len {self.seq_len}")
            input_ids[row] = torch.tensor(ids)
            labels[row, len(p) :] = torch.tensor(a)  # the answer tokens, predicted from the tokens before them
        return {"input_ids": input_ids, "labels": labels}

    def text_examples(self, n: int, seed: int) -> list[dict]:
        """The same examples as `batch(n, seed)`, as text: the answer is scored after a space (lm-eval's
        `target_delimiter`)."""
        rows = []
        for prompt, answer, info in self._examples(n, seed):
            rows.append({"prompt": render_text(prompt), "answer": render_text(answer, capitalize_first=False),
                         "task": self.name, "length": self.seq_len, **info})
        return rows


@dataclass
class PasskeyTask(WordTask):
    """Passkey retrieval / S-NIAH-1 (Mohtashami & Jaggi 2023; RULER niah_single_1): a number hidden at `depth` in
    RULER's repeated noise; the question at the end. `depth=None` draws it uniformly per example."""

    depth: float | None = None
    digits: int = 5
    name: str = "passkey"
    haystack: str = "noise"

    def needle_and_question(self, rng: np.random.Generator) -> tuple[list[list], list, list, dict]:
        key = random_digits(rng, self.digits)
        needle = ["the", "pass", "key", "is", key, ".", "remember", "it", ".", key, "is", "the", "pass", "key", "."]
        question = ["what", "is", "the", "pass", "key", "?", "the", "pass", "key", "is"]
        return [needle], question, [key], {}

    def example(self, rng: np.random.Generator) -> tuple[list, list, dict]:
        needles, question, answer, info = self.needle_and_question(rng)
        depths = [self.depth if self.depth is not None else float(rng.uniform())]
        depths += [float(rng.uniform()) for _ in needles[1:]]  # distractors anywhere
        context = self.seq_len - num_tokens(question) - num_tokens(answer)
        haystack = build_haystack(rng, self.vocab, self.haystack, context)
        items, positions = insert_needles(haystack, needles, depths, context)
        return items + question, answer, {"depth": depths[0], "needle_position": positions[0], **info}


@dataclass
class NIAHSingleTask(PasskeyTask):
    """S-NIAH-2/3 style: "one of the special magic numbers|uuids for KEY is: VALUE ." in a diverse, non-repeating
    haystack (filtering, not just retention). `value="number"` (7 digits, S-NIAH-2) or `"uuid"` (S-NIAH-3: a
    `uuid_chars`-long hex id)."""

    value: str = "number"
    uuid_chars: int = 16
    haystack: str = "diverse"
    name: str = "niah_single_2"

    def _value(self, rng: np.random.Generator) -> Spelled:
        if self.value == "uuid":
            return random_digits(rng, self.uuid_chars, alphabet="0123456789abcdef")
        return random_digits(rng, 7)

    def _needle(self, key: str, value: Spelled) -> list:
        kind = "numbers" if self.value == "number" else "uuids"
        return ["one", "of", "the", "special", "magic", kind, "for", key, "is", ":", value, "."]

    def _question(self, key: str) -> list:
        kind = "number" if self.value == "number" else "uuid"
        return ["what", "is", "the", "special", "magic", kind, "for", key, "mentioned", "in", "the", "provided",
                "text", "?", "the", "special", "magic", kind, "for", key, "mentioned", "in", "the", "provided", "text",
                "is"]

    def needle_and_question(self, rng: np.random.Generator) -> tuple[list[list], list, list, dict]:
        key = self.vocab.names[rng.integers(NUM_NAMES)]
        value = self._value(rng)
        return [self._needle(key, value)], self._question(key), [value], {}


@dataclass
class NIAHMultiKeyTask(NIAHSingleTask):
    """MK-NIAH-1: `num_needles` needles with distinct keys; only the first is asked about (distractors elsewhere)."""

    num_needles: int = 4
    name: str = "niah_multikey"

    def needle_and_question(self, rng: np.random.Generator) -> tuple[list[list], list, list, dict]:
        picks = rng.choice(NUM_NAMES, size=self.num_needles, replace=False)
        keys = [self.vocab.names[i] for i in picks]
        values = [self._value(rng) for _ in keys]
        needles = [self._needle(k, v) for k, v in zip(keys, values, strict=True)]
        return needles, self._question(keys[0]), [values[0]], {"num_needles": self.num_needles}


@dataclass
class VariableTrackingTask(WordTask):
    """RULER's variable tracking: `var X1 = 12345 .` then `var X2 = var X1 .` … (`num_hops` hops per chain,
    `num_chains` chains) scattered through the noise haystack; the answer lists the chain of the first value."""

    num_chains: int = 1
    num_hops: int = 4
    name: str = "variable_tracking"

    def example(self, rng: np.random.Generator) -> tuple[list, list, dict]:
        names = [self.vocab.names[i] for i in rng.choice(NUM_NAMES, size=self.num_chains * (self.num_hops + 1),
                                                         replace=False)]
        statements, depths, chains = [], [], []
        for c in range(self.num_chains):
            chain = names[c * (self.num_hops + 1) : (c + 1) * (self.num_hops + 1)]
            value = random_digits(rng, 5)
            chains.append((chain, value))
            # hops in increasing depth so every assignment reads a variable already defined
            hop_depths = np.sort(rng.uniform(size=len(chain)))
            statements.append(["var", chain[0], "=", value, "."])
            statements += [["var", chain[i], "=", "var", chain[i - 1], "."] for i in range(1, len(chain))]
            depths += [float(d) for d in hop_depths]
        chain, value = chains[0]
        question = ["find", "all", "variables", "that", "are", "assigned", "the", "value", value, ":"]
        answer = list(chain)
        context = self.seq_len - num_tokens(question) - num_tokens(answer)
        haystack = build_haystack(rng, self.vocab, "noise", context)
        items, positions = insert_needles(haystack, statements, depths, context)
        return items + question, answer, {"num_hops": self.num_hops, "needle_position": positions[0]}


@dataclass
class CopyTask(WordTask):
    """Copy a random string of `length` letters (Jelassi et al. 2024): `copy : s |` then `s` is the answer.
    `seq_len` is derived: 2·length + 3."""

    length: int = 16
    alphabet_size: int = 26
    seq_len: int = field(default=0, init=False)
    name: str = "copy"

    def __post_init__(self) -> None:
        self.seq_len = 2 * self.length + 3

    def example(self, rng: np.random.Generator) -> tuple[list, list, dict]:
        letters = CHARS[10 : 10 + self.alphabet_size]
        string = [letters[i] for i in rng.integers(len(letters), size=self.length)]
        return ["copy", ":", *string, "|"], string, {"copy_length": self.length}


@dataclass
class ParityWordsTask(WordTask):
    """Parity as words: `length` random bits, then `parity :` and the answer `even|odd` (Delétang et al. 2023); one
    scored token at the end, with a text form. For training and length generalisation use `parity` (below), which
    scores the running parity at every position."""

    length: int = 32
    seq_len: int = field(default=0, init=False)
    name: str = "parity_words"

    def __post_init__(self) -> None:
        self.seq_len = self.length + 3

    def example(self, rng: np.random.Generator) -> tuple[list, list, dict]:
        bits = [str(b) for b in rng.integers(2, size=self.length)]
        answer = "odd" if bits.count("1") % 2 else "even"
        return [*bits, "parity", ":"], [answer], {"bits": self.length}


# ---------------------------------------------------------------------------------------------------------------------
# State tracking as group word problems (Merrill et al. 2024; Grazzi et al. 2025, arXiv 2411.12537): read a sequence
# of group elements, output the running product after each. Parity is Z_2, modular addition Z_m, permutation
# composition S_n (S_5 is the smallest non-solvable group: no fixed-depth linear recurrence with positive
# eigenvalues tracks it).


def cyclic_group(order: int) -> tuple[list, np.ndarray]:
    """Z_order: elements 0..order-1, product = addition mod order. Returns (elements, table[a, b] = a·b)."""
    elements = list(range(order))
    return elements, np.add.outer(elements, elements) % order


def symmetric_group(degree: int) -> tuple[list, np.ndarray]:
    """S_degree: permutations as tuples of images (`p[i]` = where `i` goes) in lexicographic order; the product
    `a·b` applies `a` first, then `b` (sympy's `a * b`): `(a·b)[i] = b[a[i]]`."""
    elements = list(itertools.permutations(range(degree)))
    index = {p: i for i, p in enumerate(elements)}
    table = np.array([[index[tuple(b[a[i]] for i in range(degree))] for b in elements] for a in elements])
    return elements, table


@dataclass
class GroupWordTask:
    """Running product of `length` uniformly random group elements. Token ids: 0 is a blank, element `e` (index in
    the group's element list) is `1 + e`; labels use the same ids.

    Row layout (seq_len = length + 1): `x_1 … x_length <blank>`; in transformers' convention `labels[t]` (the target
    of the output that has just read `x_t`) is the product `x_1 · … · x_t`, for t = 1..length. The trailing blank
    gives the last product a position. `score="last"` keeps only the final product (the word problem's answer, one
    per row: the length-generalisation metric); `"all"` scores every prefix (training: a row of length L teaches
    every length up to L)."""

    group: str = "cyclic"  # cyclic | symmetric
    order: int = 2  # cyclic: the modulus; symmetric: the degree n of S_n
    length: int = 32
    score: str = "all"  # all | last
    vocab_size: int | None = None  # None: the smallest that fits (group size + 1)
    seq_len: int = field(default=0, init=False)
    name: str = "group_word"

    def __post_init__(self) -> None:
        if self.group not in ("cyclic", "symmetric"):
            raise ValueError(f"{self.name}: group must be 'cyclic' or 'symmetric', got {self.group!r}")
        if self.order < 2 or (self.group == "symmetric" and self.order > 6):
            raise ValueError(f"{self.name}: order must be >= 2 (and <= 6 for symmetric groups), got {self.order}")
        if self.score not in ("all", "last"):
            raise ValueError(f"{self.name}: score must be 'all' or 'last', got {self.score!r}")
        if self.length < 1:
            raise ValueError(f"{self.name}: length must be >= 1, got {self.length}")
        size = len(self.elements)
        if self.vocab_size is None:
            self.vocab_size = size + 1
        elif self.vocab_size < size + 1:
            raise ValueError(f"{self.name}: vocab_size must be >= {size + 1} (blank + {size} elements), "
                             f"got {self.vocab_size}")
        self.seq_len = self.length + 1

    @property
    def elements(self) -> list:
        return _group(self.group, self.order)[0]

    @property
    def table(self) -> np.ndarray:
        return _group(self.group, self.order)[1]

    def element_batch(self, batch_size: int, seed: int) -> np.ndarray:
        """The element indices `[B, length]` of `batch(batch_size, seed)` (for tests and analysis)."""
        return _rng(seed).integers(len(self.elements), size=(batch_size, self.length))

    def batch(self, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
        elements = self.element_batch(batch_size, seed)
        products = np.empty_like(elements)
        running = elements[:, 0]
        products[:, 0] = running
        for t in range(1, self.length):
            running = self.table[running, elements[:, t]]
            products[:, t] = running
        input_ids = np.zeros((batch_size, self.seq_len), dtype=np.int64)
        input_ids[:, : self.length] = elements + 1
        labels = np.full((batch_size, self.seq_len), IGNORE, dtype=np.int64)
        labels[:, 1:] = products + 1
        if self.score == "last":
            labels[:, 1:-1] = IGNORE
        return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels)}


@lru_cache(maxsize=16)
def _group(group: str, order: int) -> tuple[list, np.ndarray]:
    return cyclic_group(order) if group == "cyclic" else symmetric_group(order)


@dataclass
class LMStreamTask(WordTask):
    """A synthetic document for loss by position: diverse-grammar sentences in which `num_entities` names, chosen per
    document, recur as subjects/objects, so context beyond the last sentence helps predict them. Every position is
    scored (next-token prediction)."""

    num_entities: int = 8
    entity_rate: float = 0.5
    name: str = "lm_stream"

    def example(self, rng: np.random.Generator) -> tuple[list, list, dict]:
        entities = [self.vocab.names[i] for i in rng.choice(NUM_NAMES, size=self.num_entities, replace=False)]
        items: list = []
        while len(items) < self.seq_len:
            sentence = diverse_sentence(rng, self.vocab)
            # replace nouns by the document's entities at `entity_rate`
            nouns = set(self.vocab.lexicon["noun"])
            sentence = [entities[rng.integers(len(entities))] if w in nouns and rng.uniform() < self.entity_rate
                        else w for w in sentence]
            items.extend(sentence)
        return [], items[: self.seq_len], {}


@dataclass
class TaskMixture:
    """Several tasks (e.g. MQAR slices of different lengths) in turn: batch `seed` comes from task `seed % n`, so
    consecutive training steps cycle through them. Rows differ in length between tasks, never within a batch."""

    tasks: list

    @property
    def vocab_size(self) -> int:
        return max(task.vocab_size for task in self.tasks)

    @property
    def seq_len(self) -> int:
        return max(task.seq_len for task in self.tasks)

    def batch(self, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
        return self.tasks[seed % len(self.tasks)].batch(batch_size, seed)


# ---------------------------------------------------------------------------------------------------------------------
# the registry


TASKS: dict[str, tuple[type, dict]] = {
    "mqar": (MQARTask, {}),
    "forgetting_mqar": (ForgettingMQARTask, {}),
    "passkey": (PasskeyTask, {}),
    "niah_single_1": (PasskeyTask, {"name": "niah_single_1"}),
    "niah_single_2": (NIAHSingleTask, {"value": "number", "name": "niah_single_2"}),
    "niah_single_3": (NIAHSingleTask, {"value": "uuid", "name": "niah_single_3"}),
    "niah_multikey": (NIAHMultiKeyTask, {}),
    "variable_tracking": (VariableTrackingTask, {}),
    "copy": (CopyTask, {}),
    "parity_words": (ParityWordsTask, {}),
    "parity": (GroupWordTask, {"group": "cyclic", "order": 2, "name": "parity"}),
    "modular_addition": (GroupWordTask, {"group": "cyclic", "order": 5, "name": "modular_addition"}),
    "permutation_s3": (GroupWordTask, {"group": "symmetric", "order": 3, "name": "permutation_s3"}),
    "permutation_s5": (GroupWordTask, {"group": "symmetric", "order": 5, "name": "permutation_s5"}),
    "lm_stream": (LMStreamTask, {}),
}


def make_task(name: str, **params):
    """The task `name` with its parameters overridden by `params` (e.g. `make_task("mqar", seq_len=128,
    num_kv_pairs=16, vocab_size=512)`). Unknown names or parameters raise with the allowed ones."""
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; choose one of: {', '.join(TASKS)}.")
    cls, defaults = TASKS[name]
    allowed = {f.name for f in cls.__dataclass_fields__.values() if f.init} - {"name"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ValueError(f"task {name!r}: unknown parameters {unknown}; allowed: {sorted(allowed)}.")
    return cls(**{**defaults, **params})


def task_params(task) -> dict:
    """The parameters that rebuild `task` with `make_task(task.name, **task_params(task))`."""
    params = asdict(task)
    params.pop("name", None)
    if isinstance(task, CopyTask | ParityWordsTask | GroupWordTask):
        params.pop("seq_len")  # derived from `length`
    return params


def chance_accuracy(task) -> float:
    """Accuracy of guessing uniformly among the plausible answers (for 'near chance' statements)."""
    if isinstance(task, MQARTask | ForgettingMQARTask):
        return 1.0 / (task.vocab_size - task.vocab_size // 2)
    if isinstance(task, ParityWordsTask):
        return 0.5
    if isinstance(task, GroupWordTask):
        return 1.0 / len(task.elements)
    return 0.0


__all__ = ["IGNORE", "MQAR_EXTRAPOLATION_SLICES", "MQAR_STANDARD_SLICES", "TASKS", "Spelled", "batch_seed",
           "chance_accuracy", "make_task", "power_law_gap_probs", "render_text", "task_params", "word_vocabulary"]

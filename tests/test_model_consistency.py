"""Every block type, alone and mixed, inside the full model: the cache must make incremental runs exact.

References are the same model run another way: one full forward vs. the same tokens fed in pieces, each prompt
generated alone vs. a left-padded batch, generation with the cache vs. recomputing everything without it.
"""

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from hybridzoo import HybridForCausalLM
from hybridzoo.modeling import CACHE_NAME
from tiny_models import ALL_PATTERNS, PAD, tiny_config


def _model(pattern: str) -> HybridForCausalLM:
    return HybridForCausalLM(tiny_config(pattern)).eval()


def _random_split(length: int, generator: torch.Generator) -> list[int]:
    """Prefill, then chunks of random sizes, then single tokens."""
    sizes = [int(torch.randint(2, 6, (1,), generator=generator))]
    while sum(sizes) < length - 3:
        sizes.append(int(torch.randint(1, 5, (1,), generator=generator)))
    sizes = sizes[:-1] if sum(sizes) > length - 3 else sizes
    sizes += [1] * (length - sum(sizes))
    return sizes


@pytest.mark.parametrize("pattern", ALL_PATTERNS)
def test_full_forward_equals_any_split(pattern):
    model = _model(pattern)
    input_ids = torch.randint(3, 64, (2, 17))
    with torch.no_grad():
        full = model(input_ids, use_cache=False).logits
        for seed in range(2):
            sizes = _random_split(input_ids.shape[1], torch.Generator().manual_seed(seed))
            cache, pieces, start = None, [], 0
            for size in sizes:
                out = model(input_ids[:, start : start + size], **{CACHE_NAME: cache}, use_cache=True)
                cache, start = getattr(out, CACHE_NAME), start + size
                pieces.append(out.logits)
            torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=2e-5, rtol=1e-4, msg=f"split {sizes}")


@pytest.mark.parametrize("pattern", ALL_PATTERNS)
def test_left_padded_batch_generation_equals_each_prompt_alone(pattern):
    model = _model(pattern)
    prompts = [torch.randint(3, 64, (n,)) for n in (7, 3, 5)]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), PAD)
    attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = prompt
        attention_mask[row, width - len(prompt) :] = 1
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=PAD)
    kwargs.update(output_scores=True, return_dict_in_generate=True)
    batched = model.generate(input_ids, attention_mask=attention_mask, **kwargs)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], attention_mask=torch.ones(1, len(prompt), dtype=torch.long), **kwargs)
        torch.testing.assert_close(batched.sequences[row, width:], alone.sequences[0, len(prompt) :])
        for step_batched, step_alone in zip(batched.scores, alone.scores, strict=True):
            torch.testing.assert_close(step_batched[row], step_alone[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pattern", ALL_PATTERNS)
def test_generation_with_cache_equals_recomputing_without(pattern):
    model = _model(pattern)
    input_ids = torch.randint(3, 64, (2, 5))
    for kwargs in (dict(do_sample=False), dict(num_beams=3, num_return_sequences=2, do_sample=False)):
        with_cache = model.generate(input_ids, max_new_tokens=5, use_cache=True, pad_token_id=PAD, **kwargs)
        without = model.generate(input_ids, max_new_tokens=5, use_cache=False, pad_token_id=PAD, **kwargs)
        torch.testing.assert_close(with_cache, without, msg=str(kwargs))
    torch.manual_seed(1)
    sampled = model.generate(input_ids, max_new_tokens=5, do_sample=True, top_k=10, pad_token_id=PAD)
    torch.manual_seed(1)
    sampled_no_cache = model.generate(
        input_ids, max_new_tokens=5, do_sample=True, top_k=10, use_cache=False, pad_token_id=PAD
    )
    torch.testing.assert_close(sampled, sampled_no_cache)


class _CollectingStreamer(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


def test_streaming_yields_the_generated_tokens():
    model = _model("GGGA")
    prompt = torch.randint(3, 64, (1, 6))
    streamer = _CollectingStreamer()
    output = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=PAD, streamer=streamer)
    streamed = [token for chunk in streamer.chunks for token in chunk]
    assert streamed == output[0].tolist() and streamer.ended


@pytest.mark.parametrize("use_cache", [False, True, None])
@pytest.mark.parametrize("pattern", ["GLSA", "DA"])
def test_packed_documents_do_not_see_each_other(pattern, use_cache):
    """`position_ids` restarting at 0 marks a new document: every block must start it from a fresh state, whether
    or not the call builds a cache (None: the config's default, True)."""
    model = _model(pattern)
    documents = [torch.randint(3, 64, (n,)) for n in (6, 4, 7)]
    packed = torch.cat(documents)[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in documents])[None]
    with torch.no_grad():
        logits = model(packed, position_ids=position_ids, use_cache=use_cache).logits[0]
        alone = torch.cat([model(d[None], use_cache=False).logits[0] for d in documents])
    torch.testing.assert_close(logits, alone, atol=2e-5, rtol=1e-4)


def test_cache_holds_kv_only_for_attention_layers():
    model = _model("GLSA")
    out = model(torch.randint(3, 64, (2, 9)), use_cache=True)
    cache = getattr(out, CACHE_NAME)
    assert cache.get_seq_length() == 9
    assert cache.layers[2].keys.shape[-2] <= model.config.sliding_window  # sliding window keeps only the window
    assert cache.layers[3].keys.shape[-2] == 9
    gdn_conv, gdn_matrix = cache.get_block_state(0)
    assert gdn_matrix.shape == (2, 4, 8, 8) and gdn_matrix.dtype == torch.float32
    h, c = cache.get_block_state(1)
    assert h.shape == c.shape == (2, 24)

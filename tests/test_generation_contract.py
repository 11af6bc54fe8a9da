"""The contract between the model and transformers' `generate()`, on whichever transformers version is installed.

transformers 5.24 renamed the cache from `past_key_values` to `cache`; a model reading only the old name decodes every
step from an empty cache (it still runs, it is just wrong). These tests watch what `generate()` actually hands the
model at each step, that our own calls raise none of transformers' deprecation notices, and the cache errors.
The token-for-token checks against `use_cache=False` and per-prompt runs are in test_model_consistency.py.
"""

import logging
import warnings

import pytest
import torch
from transformers import DynamicCache

from hybridzoo import HybridForCausalLM, HybridForSequenceClassification
from hybridzoo.modeling import CACHE_NAME, HybridCache
from tiny_models import ALL_PATTERNS, PAD, tiny_config


def _model(pattern: str = "GLSA") -> HybridForCausalLM:
    return HybridForCausalLM(tiny_config(pattern)).eval()


@pytest.mark.parametrize("pattern", ALL_PATTERNS)
def test_every_decoding_step_continues_the_cache_of_the_previous_one(pattern):
    model = _model(pattern)
    seen = []  # (tokens fed, tokens the cache had already seen) at each call of the base model

    def record(module, args, kwargs):
        cache = kwargs.get("cache")
        fed = (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape[1]
        seen.append((fed, cache.get_seq_length() if cache is not None else 0))

    handle = model.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        model.generate(torch.randint(3, 64, (2, 5)), max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    finally:
        handle.remove()
    assert seen == [(5, 0), (1, 5), (1, 6), (1, 7)]


def _transformers_notices(run) -> list[str]:
    """Deprecation warnings and transformers logger warnings raised while `run()` executes."""
    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logger = logging.getLogger("transformers")
    handler = Collect(level=logging.WARNING)
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run()
    finally:
        logger.removeHandler(handler)
    messages += [str(w.message) for w in caught if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    return messages


def test_our_calls_raise_no_deprecation_notice():
    model = _model("GLSA")
    classifier = HybridForSequenceClassification(tiny_config("GLSA", num_labels=3)).eval()
    input_ids = torch.randint(3, 64, (2, 6))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0

    def run():
        with torch.no_grad():
            out = model(input_ids, attention_mask=attention_mask, use_cache=True)
            model(input_ids[:, :1], cache=getattr(out, CACHE_NAME), use_cache=True)
            classifier(input_ids, attention_mask=attention_mask)
        for kwargs in (dict(do_sample=False), dict(num_beams=2, do_sample=False)):
            model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=3, pad_token_id=PAD, **kwargs)

    notices = [m for m in _transformers_notices(run) if "deprecat" in m.lower()]
    assert notices == []


def test_the_old_cache_name_still_works():
    model = _model("GLSA")
    input_ids = torch.randint(3, 64, (1, 7))
    with torch.no_grad():
        first = model(input_ids[:, :4], use_cache=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # transformers >= 5.24 announces the rename, as for Llama
            old = model(input_ids[:, 4:], past_key_values=getattr(first, CACHE_NAME), use_cache=True).logits
        full = model(input_ids, use_cache=False).logits
    torch.testing.assert_close(old, full[:, 4:], atol=2e-5, rtol=1e-4)


def test_a_plain_dynamic_cache_is_refused_with_the_fix():
    model = _model("GLSA")
    input_ids = torch.randint(3, 64, (1, 5))
    with pytest.raises(TypeError, match="HybridCache"):
        model(input_ids, cache=DynamicCache(config=model.config), use_cache=True)
    with pytest.raises(TypeError, match="HybridCache"):
        model.generate(input_ids, **{CACHE_NAME: DynamicCache(config=model.config)}, max_new_tokens=2, pad_token_id=PAD)


def test_a_user_given_hybrid_cache_is_continued_by_generate():
    model = _model("GLSA")
    prompt = torch.randint(3, 64, (1, 8))
    cache = HybridCache(model.config)
    with torch.no_grad():
        model(prompt[:, :-1], cache=cache, use_cache=True)
    continued = model.generate(prompt, **{CACHE_NAME: cache}, max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    fresh = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    torch.testing.assert_close(continued, fresh)


def test_static_cache_request_generates_the_same_tokens():
    # a recurrent state has no static layout: generate() keeps the model's own cache and gives the same tokens
    model = _model("GLSA")
    input_ids = torch.randint(3, 64, (2, 5))
    default = model.generate(input_ids, max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    static = model.generate(
        input_ids, max_new_tokens=4, do_sample=False, pad_token_id=PAD, cache_implementation="static"
    )
    torch.testing.assert_close(static, default)


def test_assisted_decoding_is_refused_since_a_recurrent_state_cannot_roll_back():
    model, assistant = _model("GLSA"), _model("GLSA")
    with pytest.raises(ValueError, match="stateful"):
        model.generate(torch.randint(3, 64, (1, 5)), assistant_model=assistant, max_new_tokens=3, pad_token_id=PAD)
    with pytest.raises(RuntimeError, match="rolled back"):
        HybridCache(model.config).crop(1)

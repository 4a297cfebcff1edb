"""Per-row token choice of the batched engine (pure numpy, no model)."""

from __future__ import annotations

import numpy as np
from loraplex.runtime.engines.base import SamplingParams
from loraplex.runtime.engines.batched.sampling import RowSampler, apply_repetition_penalty, choose_tokens, sample_token

LOGITS = np.array([1.0, 3.0, 2.5, -1.0, 3.0, 0.5], dtype=np.float32)


def test_greedy_takes_the_first_maximum_like_genai():
    samplers = [RowSampler(SamplingParams(), [0], LOGITS.size), RowSampler(SamplingParams(top_k=1, temperature=2.0),
                                                                           [0], LOGITS.size)]
    assert choose_tokens(np.stack([LOGITS, LOGITS[::-1]]), samplers) == [1, 1]


def test_repetition_penalty_divides_positive_and_multiplies_negative_scores():
    seen = np.array([False, True, False, True, False, False])
    out = apply_repetition_penalty(LOGITS, seen, 2.0)
    np.testing.assert_array_equal(out, [1.0, 1.5, 2.5, -2.0, 3.0, 0.5])
    # Greedy with the penalty: token 1 (seen in the prompt) loses to token 4.
    sampler = RowSampler(SamplingParams(repetition_penalty=2.0), [1, 3], LOGITS.size)
    assert choose_tokens(LOGITS[None], [sampler]) == [4]
    assert sampler.seen[4]  # generated tokens count as seen from now on


def test_top_k_and_top_p_restrict_the_draw():
    rng = np.random.default_rng(0)
    top2 = {sample_token(LOGITS, SamplingParams(temperature=1.0, top_k=2), rng) for _ in range(200)}
    assert top2 == {1, 4}  # the two 3.0 scores
    nucleus = {sample_token(LOGITS, SamplingParams(temperature=1.0, top_p=0.5), rng) for _ in range(200)}
    assert nucleus <= {1, 4} and len(nucleus) == 2
    hot = {sample_token(LOGITS, SamplingParams(temperature=5.0), rng) for _ in range(400)}
    assert hot == set(range(LOGITS.size))


def test_same_seed_same_draws():
    params = SamplingParams(temperature=1.0, seed=3)
    a, b = RowSampler(params, [0], LOGITS.size), RowSampler(params, [0], LOGITS.size)
    assert [a.choose(LOGITS) for _ in range(20)] == [b.choose(LOGITS) for _ in range(20)]
    c = RowSampler(SamplingParams(temperature=1.0, seed=4), [0], LOGITS.size)
    assert [a.choose(LOGITS) for _ in range(20)] != [c.choose(LOGITS) for _ in range(20)]


def test_constrained_rows_choose_only_allowed_tokens_greedy_or_sampled(recipe_package):
    """A constrained row's choice is masked (greedy and sampled), the matcher advances with it, and a
    free row in the same step keeps its plain greedy token."""
    from loraplex.adapters.package.genai_config import GenaiConfig
    from loraplex.adapters.package.output import OutputConstraint
    from loraplex.runtime.engines.batched.sampling import NonFiniteLogits
    from loraplex.runtime.engines.guidance import Guidance
    from loraplex.runtime.server.tokenizer import PackageTokenizer

    config = GenaiConfig.load(recipe_package)
    vocab = config.vocab_size
    guidance = Guidance(recipe_package / "tokenizer.json", vocab, config.eos_token_ids)
    tokenizer = PackageTokenizer(recipe_package)
    rng = np.random.default_rng(0)
    digits = OutputConstraint("regex", "[0-9]{3}")
    for params in (SamplingParams(), SamplingParams(temperature=1.0, seed=5), SamplingParams(repetition_penalty=1.5)):
        constrained = RowSampler(params, [0], vocab, guidance.row(digits))
        free = RowSampler(SamplingParams(), [0], vocab)
        out: list[int] = []
        while not constrained.constraint.complete:
            logits = rng.normal(size=(2, vocab)).astype(np.float32)
            token, plain = choose_tokens(logits, [constrained, free])
            assert plain == int(np.argmax(logits[1]))
            out.append(token)
        assert len(tokenizer.decode(out)) == 3 and tokenizer.decode(out).isdigit(), out
    broken = RowSampler(SamplingParams(), [0], vocab, guidance.row(digits))
    nan = np.full((1, vocab), np.nan, dtype=np.float32)
    assert isinstance(choose_tokens(nan, [broken])[0], NonFiniteLogits)


def test_masks_without_llguidance_slices_equal_the_sliced_ones(recipe_package):
    """The runner's tokenizer leaves llguidance's slices out (memory): every mask along a JSON reply
    equals the one a default (sliced) tokenizer computes."""
    import json

    import llguidance as llg
    from loraplex.adapters.package.genai_config import GenaiConfig
    from loraplex.adapters.package.output import OutputConstraint
    from loraplex.runtime.engines.guidance import Guidance, grammar_of

    config = GenaiConfig.load(recipe_package)
    schema = OutputConstraint("json_schema", json.dumps({
        "type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
        "required": ["name", "n"]}))
    ours = Guidance(recipe_package / "tokenizer.json", config.vocab_size, config.eos_token_ids).row(schema)
    sliced_tokenizer = llg.LLTokenizer((recipe_package / "tokenizer.json").read_text(encoding="utf-8"),
                                       n_vocab=config.vocab_size, eos_token=sorted(set(config.eos_token_ids)))
    sliced = llg.LLMatcher(sliced_tokenizer, grammar_of(schema))
    bits = np.zeros((config.vocab_size + 31) // 32, dtype=np.int32)
    steps = 0
    for token in sliced_tokenizer.tokenize_str('{"name":"a b c","n":42}'):
        sliced.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
        expected = np.unpackbits(bits.view(np.uint8), bitorder="little")[: config.vocab_size].astype(bool)
        assert np.array_equal(ours.allowed(), expected) and expected[token]
        ours.advance(token)
        assert sliced.consume_token(token)
        steps += 1
    assert steps > 5

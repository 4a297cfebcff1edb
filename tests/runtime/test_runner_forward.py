"""`ModelRunner.forward`: rows that feed several tokens after a past already in their KV row (a
cached prefix, proposed tokens to check) compute exactly what one plain prefill of the whole
sequence computes, batched with rows that have no past, reading logits at several positions (fp32,
and int4: `tests.fixtures.quantized`)."""

from __future__ import annotations

import numpy as np
import pytest
from loraplex.adapters.package.adapter_file import read_adapter_file
from loraplex.adapters.package.reader import Package
from loraplex.runtime.engines.batched.runner import ModelRunner, RowInput
from loraplex.runtime.engines.batched.scheduler import BatchedAdapter

from tests.fixtures.quantized import int4_copy

ATOL = 1e-5  # fp32: the same kernels on the same values, summed in another order at most


@pytest.fixture(scope="module", params=["fp32", "int4"])
def runner(request, recipe_package, tmp_path_factory):
    root = recipe_package if request.param == "fp32" else \
        int4_copy(recipe_package, tmp_path_factory.mktemp("recipe_int4") / "package")
    package = Package.open(root)
    runner = ModelRunner(package, max_batch=4, max_slots=2)
    for slot, name in enumerate(("alpha", "beta"), start=1):
        weights = read_adapter_file(package.adapter_path(name), package.lora_inputs)
        runner.bank.fill(slot, BatchedAdapter(name=name, version="1", path=weights.path, weights=weights))
    yield runner
    runner.close()


def _sequences(runner: ModelRunner) -> list[list[int]]:
    rng = np.random.default_rng(7)
    return [[int(t) for t in rng.integers(2, runner.config.vocab_size, n)] for n in (40, 25, 30)]


def _plain(runner: ModelRunner, slot: int, tokens: list[int], read: list[int]) -> np.ndarray:
    """Logits of one plain prefill of `tokens` (alone, on the last KV row)."""
    return runner.forward(3, [RowInput(slot, 0, tokens, read)], keep=0).copy()[0]


def test_rows_with_a_past_and_rows_without_match_a_plain_prefill_at_every_position_read(runner):
    a, b, c = _sequences(runner)
    want_a = _plain(runner, 1, a, list(range(16, 40)))
    want_b = _plain(runner, 2, b, list(range(8, 25)))
    want_c = _plain(runner, 0, c, [29, 3])
    # The pasts: a's first 16 tokens and b's first 8, in one right-padded run.
    runner.forward(0, [RowInput(1, 0, a[:16]), RowInput(2, 0, b[:8])], keep=0)
    got = runner.forward(0, [RowInput(1, 16, a[16:], list(range(24))), RowInput(2, 8, b[8:], list(range(17))),
                             RowInput(0, 0, c, [-1, 3])], keep=0)
    assert got.shape == (3, 24, runner.config.vocab_size)
    np.testing.assert_allclose(got[0], want_a, rtol=0, atol=ATOL)
    np.testing.assert_allclose(got[1, :17], want_b, rtol=0, atol=ATOL)
    np.testing.assert_allclose(got[1, 17:], np.repeat(want_b[-1:], 7, axis=0), rtol=0, atol=ATOL)  # last repeated
    np.testing.assert_allclose(got[2, :2], want_c, rtol=0, atol=ATOL)
    # The slots matter, so the comparison can fail: a's logits under the base differ.
    assert np.abs(_plain(runner, 0, a, [39]) - want_a[-1]).max() > 1e-2
    # The KV rows now hold the whole sequences: one more token each, batched, equals a plain prefill.
    nxt = runner.forward(0, [RowInput(1, 40, [5]), RowInput(2, 25, [6]), RowInput(0, 30, [7])], keep=3).copy()
    for row, (slot, seq, token) in enumerate(((1, a, 5), (2, b, 6), (0, c, 7))):
        np.testing.assert_allclose(nxt[row, 0], _plain(runner, slot, seq + [token], [-1])[0], rtol=0, atol=ATOL)


def test_several_tokens_after_a_past_in_one_row_read_at_each_position(runner):
    """What checking proposed tokens does: feed k tokens after the past, read the logits after each."""
    a, _, _ = _sequences(runner)
    want = _plain(runner, 1, a, [35, 36, 37, 38, 39])
    runner.forward(0, [RowInput(1, 0, a[:35])], keep=0)
    got = runner.forward(0, [RowInput(1, 35, a[35:], [0, 1, 2, 3, 4])], keep=1)
    np.testing.assert_allclose(got[0], want, rtol=0, atol=ATOL)


def test_rows_of_one_token_run_beside_rows_of_several(runner):
    a, b, c = _sequences(runner)
    want = [_plain(runner, 1, a, [-1]), _plain(runner, 2, b, [-3, -2, -1]), _plain(runner, 0, c, [-1])]
    runner.forward(0, [RowInput(1, 0, a[:-1]), RowInput(2, 0, b[:-3]), RowInput(0, 0, c[:-1])], keep=0)
    got = runner.forward(0, [RowInput(1, 39, a[-1:]), RowInput(2, 22, b[-3:], [0, 1, 2]), RowInput(0, 29, c[-1:])],
                         keep=3)
    for row, logits in enumerate(want):
        np.testing.assert_allclose(got[row, :len(logits)], logits, rtol=0, atol=ATOL)


def test_a_row_without_tokens_or_reading_outside_its_tokens_is_refused(runner):
    with pytest.raises(ValueError, match="at least one token"):
        runner.forward(0, [RowInput(0, 0, [])], keep=0)
    with pytest.raises(ValueError, match="outside the row's 2 new tokens"):
        runner.forward(0, [RowInput(0, 0, [3, 4], [2])], keep=0)

"""Host-side rollout batches: the row layout of `from_rollout`, merging rounds of different prompt
widths, and DAPO dynamic sampling (`informative_groups`, `fill_groups`) on hand-made batches."""

import types

import numpy as np
import pytest

from jaxcov.batch import (RolloutBatch, concat, fill_groups, from_rollout, informative_groups,
                          take_groups)

FIELDS = ("tokens", "attention_mask", "response_mask", "sampler_logp", "rewards", "stopped")


def hand_batch(rewards, n=2, prompt_width=2, response_width=3, first_row=0):
    """Rows whose every field says which row they are: row r (numbered from `first_row`) has
    tokens 100 r + column, r % 2 left-padding columns, a response of 1 + r % 3 tokens with
    sampler log-prob -r - column / 10, and `stopped` = r even."""
    rows = len(rewards)
    r = first_row + np.arange(rows)
    columns = np.arange(prompt_width + response_width)
    is_response = columns >= prompt_width
    pads_r1, lengths_r1 = (r % 2)[:, None], (1 + r % 3)[:, None]
    response = is_response & (columns < prompt_width + lengths_r1)
    attention = ((~is_response) & (columns >= pads_r1)) | response
    return RolloutBatch(
        tokens=(100 * r[:, None] + columns).astype(np.int32), attention_mask=attention,
        response_mask=response,
        sampler_logp=np.where(response, -r[:, None] - columns / 10, 0.0).astype(np.float32),
        rewards=np.asarray(rewards, np.float32), stopped=r % 2 == 0,
        examples=[{"id": first_row // n + g} for g in range(rows // n)],
        responses=[f"response {i}" for i in r], n=n, prompt_width=prompt_width)


def assert_rows_of_groups(chosen, source, groups):
    """`chosen` is `source`'s groups in this order, each group's n rows together."""
    rows = [g * source.n + j for g in groups for j in range(source.n)]
    for field in FIELDS:
        np.testing.assert_array_equal(getattr(chosen, field), getattr(source, field)[rows],
                                      err_msg=field)
    assert chosen.examples == [source.examples[g] for g in groups]
    assert chosen.responses == [source.responses[r] for r in rows]
    assert (chosen.n, chosen.prompt_width, chosen.groups) == (source.n, source.prompt_width,
                                                              len(groups))


def test_from_rollout_puts_each_log_prob_at_its_token():
    """Response token j of a row sits at column P + j of tokens, masks and sampler log-probs,
    the columns the trainer's teacher-forced log-probs use (train.old_logprobs=sampler)."""
    rollout = types.SimpleNamespace(
        prompt_ids=np.array([[0, 5, 6], [7, 8, 9]]),
        prompt_mask=np.array([[0, 1, 1], [1, 1, 1]], bool),
        response_ids=np.array([[11, 12], [13, 0]]),
        response_mask=np.array([[1, 1], [1, 0]], bool),
        policy_logprobs=np.array([[-0.5, -1.5], [-2.5, 0.0]]),
        stopped=np.array([False, True]))
    batch = from_rollout(rollout, [{"id": 0}], 2, ["a", "b"], np.array([1.0, 0.0]))
    np.testing.assert_array_equal(batch.tokens, [[0, 5, 6, 11, 12], [7, 8, 9, 13, 0]])
    np.testing.assert_array_equal(batch.attention_mask, [[0, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    np.testing.assert_array_equal(batch.response_mask, [[0, 0, 0, 1, 1], [0, 0, 0, 1, 0]])
    np.testing.assert_array_equal(batch.sampler_logp, [[0, 0, 0, -0.5, -1.5],
                                                       [0, 0, 0, -2.5, 0.0]])
    assert batch.sampler_logp.dtype == np.float32 and batch.tokens.dtype == np.int32
    assert (batch.prompt_width, batch.groups) == (3, 1)
    np.testing.assert_array_equal(batch.response_lengths, [2, 1])


def test_informative_groups_are_those_with_unequal_rewards():
    rewards = np.array([1, 1, 1, 0, 1, 1, 0.5, 0.5, 0.5, 1, 0, 0, 0.1, 0.1, 0.2], np.float32)
    np.testing.assert_array_equal(informative_groups(rewards, 3), [0, 1, 0, 1, 1])
    # One group of two, and groups of one (always uniform).
    np.testing.assert_array_equal(informative_groups(np.array([0.0, -1.0]), 2), [1])
    np.testing.assert_array_equal(informative_groups(np.array([0.0, -1.0]), 1), [0, 0])


# Five groups of two; groups 1, 3 and 4 have varied rewards.
REWARDS = [1, 1, 0, 1, 0, 0, 1, 0, 0.5, 0.25]


@pytest.mark.parametrize("wanted, groups, kept", [
    (3, [1, 3, 4], 3),     # exactly the informative ones, in batch order
    (2, [1, 3], 2),        # more informative than needed: the first ones
    (4, [1, 3, 4, 0], 3),  # too few: topped up with the first uniform groups
    (5, [1, 3, 4, 0, 2], 3),
])
def test_fill_groups_takes_informative_groups_first_then_uniform_ones(wanted, groups, kept):
    batch = hand_batch(REWARDS)
    chosen, informative = fill_groups(batch, wanted, filter_groups=True)
    assert informative == kept
    assert_rows_of_groups(chosen, batch, groups)


def test_fill_groups_without_filtering_keeps_the_first_groups_and_counts_informative():
    batch = hand_batch(REWARDS)
    chosen, informative = fill_groups(batch, 3, filter_groups=False)
    assert informative == 1  # of groups 0, 1, 2 only group 1 varies
    assert_rows_of_groups(chosen, batch, [0, 1, 2])


def test_fill_groups_when_every_group_is_uniform():
    batch = hand_batch([1, 1, 0, 0, 0.5, 0.5, 1, 1])
    for filter_groups in (True, False):
        chosen, informative = fill_groups(batch, 3, filter_groups)
        assert informative == 0
        assert_rows_of_groups(chosen, batch, [0, 1, 2])


def test_concat_left_pads_narrower_prompts_and_keeps_rows_in_order():
    narrow = hand_batch([1, 1, 0, 1], prompt_width=2)
    wide = hand_batch([0, 1, 1, 1], prompt_width=3, first_row=4)
    merged = concat([narrow, wide])
    assert (merged.prompt_width, merged.n, merged.groups) == (3, 2, 4)
    for field in ("tokens", "attention_mask", "response_mask", "sampler_logp"):
        value = getattr(merged, field)
        assert not value[:4, 0].any(), field  # one new padding column in front of `narrow`
        np.testing.assert_array_equal(value[:4, 1:], getattr(narrow, field), err_msg=field)
        np.testing.assert_array_equal(value[4:], getattr(wide, field), err_msg=field)
    for field in ("rewards", "stopped"):
        np.testing.assert_array_equal(getattr(merged, field), np.concatenate(
            [getattr(narrow, field), getattr(wide, field)]))
    assert merged.examples == [{"id": 0}, {"id": 1}, {"id": 2}, {"id": 3}]
    assert merged.responses == narrow.responses + wide.responses
    # Dynamic sampling over both rounds: the varied groups 1 (round 1) and 2 (round 2).
    chosen, informative = fill_groups(merged, 2, filter_groups=True)
    assert informative == 2
    assert_rows_of_groups(chosen, merged, [1, 2])
    np.testing.assert_array_equal(chosen.tokens[:2, 1:], narrow.tokens[2:])


def test_take_groups_in_any_order():
    batch = hand_batch(REWARDS)
    assert_rows_of_groups(take_groups(batch, [4, 0, 2]), batch, [4, 0, 2])

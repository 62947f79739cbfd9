"""mmsae.codes.top_lists.TopLists: running per-feature top lists merged in bulk, against brute force."""

import numpy as np

from mmsae.codes.top_lists import TopLists


def _offer(lists, names, feature, sample, score):
    score = np.asarray(score, np.float32)
    return lists.offer(np.asarray(feature), np.asarray(sample), score, score * 2, np.arange(len(score)), names)


def test_equal_scores_across_the_cut_keep_the_smaller_names():
    """keep 2; scores 3, 2, 2 from samples c, b, a offered in that order: a stays (a < b) even
    though b came first, and the order within equal scores is by name."""
    names = ["c", "b", "a"]
    lists = TopLists(2, pending=1)
    _offer(lists, names, [0], [0], [3.0])
    _offer(lists, names, [0, 0], [1, 2], [2.0, 2.0])
    f, sample, score, act, _ = lists.ranked(names)
    assert [names[s] for s in sample] == ["c", "a"] and score.tolist() == [3.0, 2.0] and act.tolist() == [6.0, 4.0]
    assert lists.threshold.tolist() == [2.0]


def test_many_flushes_equal_one_sort_of_everything():
    """Random offers on a coarse score grid (many ties), names not in offer order, queues flushed
    every few offers: the lists equal a plain sort of all offers by (score desc, name)."""
    rng = np.random.default_rng(0)
    names = [f"s{rng.integers(10**6):06d}-{i}" for i in range(400)]
    keep, d = 4, 9
    lists = TopLists(keep, pending=7)
    offered = []
    for chunk in np.array_split(np.arange(400), 37):  # each sample offered to each feature at most once
        feature = rng.integers(0, d, len(chunk))
        score = rng.integers(0, 5, len(chunk)) * 0.5
        _offer(lists, names, feature, chunk, score)
        offered += zip(feature.tolist(), chunk.tolist(), score.tolist())
    lists.flush(names)
    f, sample, score, _, _ = lists.ranked(names)
    got = list(zip(f.tolist(), [names[s] for s in sample], score.tolist()))
    want = []
    for feat in range(d):
        rows = sorted((-sc, names[s]) for ff, s, sc in offered if ff == feat)[:keep]
        want += [(feat, name, -neg) for neg, name in rows]
    assert got == want
    thr = [-np.inf] * d
    for feat in range(d):
        scores = [sc for ff, sc in zip(f.tolist(), score.tolist()) if ff == feat]
        thr[feat] = scores[keep - 1] if len(scores) == keep else -np.inf
    assert lists.threshold[:d].tolist() == thr


def test_offers_wait_until_the_queue_is_long_enough():
    lists = TopLists(2, pending=3)
    names = ["a", "b", "c"]
    assert not _offer(lists, names, [0, 1], [0, 1], [1.0, 1.0])
    assert lists.ranked(names)[0].size == 0  # queued, not merged
    assert _offer(lists, names, [0], [2], [5.0])
    assert lists.ranked(names)[0].tolist() == [0, 0, 1]


def test_distinct_token_keeps_one_entry_per_score_and_token():
    """Text lists (distinct_token): samples with the same score at the same token share one context
    (a shared prompt prefix); the smallest name stands for them, even when it arrives after the others
    were merged, and the freed slots go to the next distinct contexts."""
    names = ["t3", "t1", "t2", "u", "v"]
    lists = TopLists(2, pending=1, distinct_token=True)

    def offer(sample, score, token):
        score = np.asarray(score, np.float32)
        lists.offer(np.zeros(len(sample), np.int64), np.asarray(sample), score, score, np.asarray(token), names)

    offer([0, 2], [5.0, 5.0], [7, 7])  # t3, t2: one context
    offer([3], [4.0], [2])  # u
    offer([1], [5.0], [7])  # t1 comes last, same context: it stands for it
    offer([4], [5.0], [8])  # v: the same score at another token is another context
    lists.flush(names)
    _, sample, score, _, token = lists.ranked(names)
    assert [names[s] for s in sample] == ["t1", "v"] and token.tolist() == [7, 8]
    plain = TopLists(2, pending=1)
    plain.offer(np.zeros(3, np.int64), np.array([0, 2, 1]), np.full(3, 5.0, np.float32), np.full(3, 5.0, np.float32),
                np.full(3, 7), names)
    assert [names[s] for s in plain.ranked(names)[1]] == ["t1", "t2"]  # without it: copies of one context

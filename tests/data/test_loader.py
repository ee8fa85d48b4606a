"""perfml.data.TokenLoader: packed windows, per-epoch shuffling, exact resume, rank sharding."""

import itertools
import json

import pytest
import torch

from perfml.data import TokenLoader

T = 8


def stream(n: int = 16 * T + 1) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int32)


def take(loader, n):
    return list(itertools.islice(loader, n))


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_windows_and_shifted_labels():
    tokens = stream()
    loader = TokenLoader(tokens, batch_size=2, seq_len=T, shuffle=False)
    x, y = next(loader)
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (2, T)
    assert torch.equal(x[0], tokens[:T].long()) and torch.equal(y[0], tokens[1 : T + 1].long())
    assert torch.equal(x[1], tokens[T : 2 * T].long())  # windows overlap by one token
    assert torch.equal(y[:, :-1], x[:, 1:])


def test_an_epoch_sees_every_window_once():
    loader = TokenLoader(stream(), batch_size=4, seq_len=T, seed=3)
    assert len(loader) == 4 and loader.num_windows == 16
    for _ in range(2):
        starts = torch.cat([x[:, 0] for x, _ in take(loader, len(loader))])
        assert sorted(starts.tolist()) == [i * T for i in range(16)]
    assert loader.epoch == 2 and loader.position == 0


def test_order_depends_on_seed_and_epoch_only():
    a = take(TokenLoader(stream(), 4, T, seed=1), 8)
    assert_same_batches(a, take(TokenLoader(stream(), 4, T, seed=1), 8))
    other = take(TokenLoader(stream(), 4, T, seed=2), 8)
    assert not all(torch.equal(x, y) for (x, _), (y, _) in zip(a, other, strict=True))
    epoch0 = torch.cat([x[:, 0] for x, _ in a[:4]])
    epoch1 = torch.cat([x[:, 0] for x, _ in a[4:]])
    assert not torch.equal(epoch0, epoch1)  # reshuffled every epoch
    plain = take(TokenLoader(stream(), 4, T, shuffle=False), 5)
    assert torch.equal(plain[4][0], plain[0][0])  # in order, and round again


@pytest.mark.parametrize("k, m", [(0, 5), (3, 4), (4, 6), (9, 7)])
def test_resume_gives_the_same_batches(k, m):
    loader = TokenLoader(stream(), 4, T, seed=7)
    take(loader, k)
    state = json.loads(json.dumps(loader.state_dict()))
    want = take(loader, m)
    fresh = TokenLoader(stream(), 4, T, seed=7)
    fresh.load_state_dict(state)
    assert_same_batches(take(fresh, m), want)
    assert fresh.state_dict() == loader.state_dict()


def test_state_mismatch_is_named():
    state = TokenLoader(stream(), 4, T, seed=7).state_dict()
    with pytest.raises(ValueError, match="seed"):
        TokenLoader(stream(), 4, T, seed=8).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch"):
        TokenLoader(stream(), 2, T, seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match="num_windows"):
        TokenLoader(stream(20 * T + 1), 4, T, seed=7).load_state_dict(state)
    with pytest.raises(ValueError, match="position 4"):
        TokenLoader(stream(), 4, T, seed=7).load_state_dict({**state, "position": 4})
    with pytest.raises(ValueError, match="'epoch'"):
        TokenLoader(stream(), 4, T, seed=7).load_state_dict({"position": 0})


def test_drop_last():
    tokens = stream(10 * T + 1)  # 10 windows
    assert len(TokenLoader(tokens, 4, T)) == 2
    loader = TokenLoader(tokens, 4, T, drop_last=False, shuffle=False)
    batches = take(loader, 3)
    assert len(loader) == 3 and [len(x) for x, _ in batches] == [4, 4, 2]
    assert loader.epoch == 1


def test_ranks_split_each_global_batch():
    tokens = stream(24 * T + 1)
    single = take(TokenLoader(tokens, 6, T, seed=5), 6)
    ranks = [take(TokenLoader(tokens, 2, T, seed=5, rank=r, world_size=3), 6) for r in range(3)]
    assert len(TokenLoader(tokens, 2, T, seed=5, rank=1, world_size=3)) == 4  # 6 taken: 2 epochs
    for step, (x, y) in enumerate(single):
        assert torch.equal(torch.cat([ranks[r][step][0] for r in range(3)]), x)
        assert torch.equal(torch.cat([ranks[r][step][1] for r in range(3)]), y)


def test_ranks_with_a_short_last_batch():
    tokens = stream(11 * T + 1)  # 11 windows, global batch 4: 2 full batches and 3 left over
    loaders = [TokenLoader(tokens, 2, T, drop_last=False, rank=r, world_size=2) for r in (0, 1)]
    assert [len(lo) for lo in loaders] == [3, 3]
    last = [lo.batch(0, 2)[0] for lo in loaders]
    assert [len(x) for x in last] == [2, 1]
    seen = torch.cat([lo.batch(0, i)[0][:, 0] for lo in loaders for i in range(3)])
    assert sorted(seen.tolist()) == [i * T for i in range(11)]
    # 9 windows: one left over for 2 ranks, so that batch is dropped for both
    assert len(TokenLoader(stream(9 * T + 1), 2, T, drop_last=False, world_size=2)) == 2


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="fewer than one batch"):
        TokenLoader(stream(3 * T), 4, T)
    with pytest.raises(ValueError, match="batch_size"):
        TokenLoader(stream(), 0, T)
    with pytest.raises(ValueError, match="seq_len"):
        TokenLoader(stream(), 2, 1.5)
    with pytest.raises(ValueError, match="rank"):
        TokenLoader(stream(), 2, T, rank=2, world_size=2)
    with pytest.raises(ValueError, match="1-D integer"):
        TokenLoader(stream().float(), 2, T)
    with pytest.raises(IndexError, match="batch index 8"):
        TokenLoader(stream(), 2, T).batch(0, 8)

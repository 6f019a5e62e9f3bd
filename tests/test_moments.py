"""Streaming moments against direct products on the same rows (docs/method.md §2, §6)."""
from __future__ import annotations

import pytest
import torch

from specprune_cli.errors import StatisticsError
from specprune_cli.moments import CrossMoment, SecondMoment
from specprune_cli.symmetric import sym_addmm, symmetrise_


def test_second_moment_streams_uneven_batches_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(103, 7, generator=g, dtype=torch.float64)
    acc = SecondMoment()
    for lo, hi in ((0, 1), (1, 40), (40, 41), (41, 103)):
        acc.update(x[lo:hi])
    expected = x.T @ x / 103
    assert acc.count == 103
    assert torch.linalg.norm(acc.matrix - expected) / torch.linalg.norm(expected) < 1e-12


@pytest.mark.parametrize("m", [63, 130, 200, 600])  # 1, 2, 3 and 8 column tiles
def test_second_moment_half_triangle_tiles_give_the_whole_symmetric_matrix(m):
    """Only the tiles on and below the diagonal are multiplied, the rest mirrored; the matrix must
    still be X^T X / n."""
    g = torch.Generator().manual_seed(m)
    x = torch.randn(2, m, 9, 11, generator=g)  # conv layout: 198 rows
    rows = x.permute(0, 2, 3, 1).reshape(-1, m).double()
    acc = SecondMoment().update(x[:1]).update(x[1:])
    sigma = acc.matrix
    assert acc.count == 198 and torch.equal(sigma, sigma.T)
    expected = rows.T @ rows / 198
    assert torch.linalg.norm(sigma - expected) / torch.linalg.norm(expected) < 1e-13
    copy = acc.copy()
    acc.update(x)
    assert copy.count == 198 and torch.equal(copy.matrix, sigma)  # a copy does not see later updates


def test_second_moment_copy_goes_on_like_the_original():
    """Same rows so far and the same generator state: the same further updates give the same matrix."""
    x = torch.randn(4, 3, 6, 6)
    acc = SecondMoment(max_positions=5, seed=2).update(x)
    twin = acc.copy()
    assert torch.equal(acc.update(x).matrix, twin.update(x).matrix)


def test_second_moment_merge_of_halves_equals_whole():
    x = torch.randn(50, 6, dtype=torch.float64)
    whole = SecondMoment().update(x)
    a, b = SecondMoment().update(x[:20]), SecondMoment().update(x[20:])
    merged = a.merge(b)
    assert merged.count == 50
    torch.testing.assert_close(merged.matrix, whole.matrix, atol=1e-14, rtol=1e-12)


def test_second_moment_pools_positions_and_subsamples_reproducibly():
    x = torch.randn(3, 4, 5, 6)
    rows = x.permute(0, 2, 3, 1).reshape(-1, 4).double()
    acc = SecondMoment().update(x)
    assert acc.count == 90
    torch.testing.assert_close(acc.matrix, rows.T @ rows / 90)
    s1 = SecondMoment(max_positions=7, seed=3).update(x)
    s2 = SecondMoment(max_positions=7, seed=3).update(x)
    assert s1.count == 21 and torch.equal(s1.matrix, s2.matrix)
    assert not torch.equal(s1.matrix, SecondMoment(max_positions=7, seed=4).update(x).matrix)
    lin = SecondMoment(channel_dim=-1).update(torch.ones(2, 3, 4))
    assert lin.count == 6 and lin.channels == 4


def test_second_moment_errors_say_what_to_do():
    with pytest.raises(StatisticsError, match="read before any update: run the 'observe' step"):
        SecondMoment().matrix
    x = torch.randn(4, 3)
    x[1, 2] = float("nan")
    with pytest.raises(StatisticsError) as err:
        SecondMoment().update(x)
    assert str(err.value) == ("1 of 12 activation values are NaN or Inf; check the input normalisation "
                              "(data.*.mean/std), that the checkpoint matches the architecture, and that the "
                              "model runs in eval mode")
    acc = SecondMoment().update(torch.randn(2, 3))
    with pytest.raises(StatisticsError, match="expected 3 channels, got a batch with 4"):
        acc.update(torch.randn(2, 4))


def test_second_moment_mean_is_the_row_average():
    x = torch.randn(2, 5, 3, 4, generator=torch.Generator().manual_seed(1))
    rows = x.permute(0, 2, 3, 1).reshape(-1, 5).double()
    torch.testing.assert_close(SecondMoment().update(x).mean, rows.mean(0), atol=1e-14, rtol=0)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) -> (N * positions, C) float64, each (sample, position) one row."""
    return x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1).reshape(-1, x.shape[1]).double()


@pytest.mark.parametrize("m, k0", [(6, 6), (9, 4), (130, 70)])  # the last: several tiles of the joint product
def test_cross_moment_blocks_are_the_direct_products(m, k0):
    g = torch.Generator().manual_seed(m)
    x, xt = torch.randn(3, m, 5, 4, generator=g) + 0.5, torch.randn(3, k0, 5, 4, generator=g) - 1.0
    acc = CrossMoment().update(x[:2], xt[:2]).update(x[2:], xt[2:])
    rx, rt = _rows(x), _rows(xt)
    n = rx.shape[0]
    assert acc.count == n == 60 and not acc.shared
    assert (acc.channels, acc.source_channels) == (m, k0)
    for got, want in ((acc.target, rx.T @ rx / n), (acc.source, rt.T @ rt / n), (acc.cross, rx.T @ rt / n),
                      (acc.target_mean, rx.mean(0)), (acc.source_mean, rt.mean(0))):
        torch.testing.assert_close(got, want, atol=1e-13, rtol=1e-12)
    assert acc.cross.shape == (m, k0) and acc.cross.dtype == torch.float64


def test_cross_moment_reads_both_signals_at_the_same_sampled_positions():
    """x~ made of some of x's channels: C and S~ must then be blocks of S, which holds only if every
    sampled row of x~ comes from the same (sample, position) as the row of x beside it."""
    x = torch.randn(4, 8, 7, 7, generator=torch.Generator().manual_seed(3))
    chans = torch.tensor([1, 4, 6])
    acc = CrossMoment(max_positions=10, seed=5).update(x, x[:, chans])
    assert acc.count == 40
    s = acc.target
    torch.testing.assert_close(acc.cross, s[:, chans], atol=1e-14, rtol=0)
    torch.testing.assert_close(acc.source, s[chans][:, chans], atol=1e-14, rtol=0)
    # and the positions are those SecondMoment draws from the same seed
    torch.testing.assert_close(s, SecondMoment(max_positions=10, seed=5).update(x).matrix, atol=1e-14, rtol=0)


def test_cross_moment_linear_layouts():
    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 2, generator=g)
    acc = CrossMoment(channel_dim=-1).update(x, xt)
    rx, rt = x.reshape(-1, 5).double(), xt.reshape(-1, 2).double()
    assert acc.count == 6
    torch.testing.assert_close(acc.cross, rx.T @ rt / 6)
    flat = CrossMoment().update(x[0], xt[0])  # (N, C)
    torch.testing.assert_close(flat.cross, rx[:3].T @ rt[:3] / 3)


def test_cross_moment_of_x_with_itself_is_one_second_moment():
    """Nothing pruned upstream: x~ is x, one m x m product, and all three matrices are Sigma."""
    x = torch.randn(3, 5, 4, 4, generator=torch.Generator().manual_seed(2))
    acc = CrossMoment(max_positions=6, seed=1).update(x, x)
    sigma = SecondMoment(max_positions=6, seed=1).update(x).matrix
    assert acc.shared and sorted(acc.sums()) == ["count", "target", "target_sum"]
    for got in (acc.target, acc.source, acc.cross):
        assert torch.equal(got, sigma)
    torch.testing.assert_close(acc.source_mean, acc.target_mean, atol=0, rtol=0)


def test_cross_moment_switching_from_shared_to_separate_signals_keeps_every_row():
    g = torch.Generator().manual_seed(4)
    x1, x2 = torch.randn(10, 4, generator=g), torch.randn(7, 4, generator=g)
    xt2 = torch.randn(7, 4, generator=g)
    acc = CrossMoment().update(x1, x1).update(x2, xt2).update(x1, x1)  # shared again at the end
    assert not acc.shared and acc.count == 27
    rx = torch.cat([x1, x2, x1]).double()
    rt = torch.cat([x1, xt2, x1]).double()
    torch.testing.assert_close(acc.target, rx.T @ rx / 27, atol=1e-14, rtol=1e-13)
    torch.testing.assert_close(acc.source, rt.T @ rt / 27, atol=1e-14, rtol=1e-13)
    torch.testing.assert_close(acc.cross, rx.T @ rt / 27, atol=1e-14, rtol=1e-13)
    torch.testing.assert_close(acc.source_mean, rt.mean(0), atol=1e-14, rtol=1e-13)


def test_cross_moment_merge_and_raw_sums_equal_one_pass():
    """Halves merged, or their raw sums added (as an all_reduce does) and loaded, give the whole."""
    g = torch.Generator().manual_seed(6)
    x, xt = torch.randn(30, 6, generator=g), torch.randn(30, 3, generator=g)
    whole = CrossMoment().update(x, xt)
    first, second = CrossMoment().update(x[:12], xt[:12]), CrossMoment().update(x[12:], xt[12:])
    summed = {key: first.sums()[key] + second.sums()[key] for key in first.sums()}
    loaded = CrossMoment(6, 3).load_sums(summed)
    merged = first.copy().merge(second)
    for acc in (merged, loaded):
        assert acc.count == 30
        torch.testing.assert_close(acc.cross, whole.cross, atol=1e-14, rtol=1e-12)
        torch.testing.assert_close(acc.source, whole.source, atol=1e-14, rtol=1e-12)
        torch.testing.assert_close(acc.target_mean, whole.target_mean, atol=1e-14, rtol=1e-12)
    assert first.count == 12  # copy() kept the original out of the merge
    shared = CrossMoment().update(x[:12, :3], x[:12, :3])  # a shared accumulator merges into a joint one
    joint = CrossMoment().update(x[12:, :3], xt[12:])
    both = torch.cat([x[:12, :3], xt[12:]]).double()
    torch.testing.assert_close(shared.merge(joint).source, both.T @ both / 30, atol=1e-14, rtol=1e-12)
    wrong = {"count": torch.tensor(1.0), "target": torch.eye(4), "target_sum": torch.ones(4)}
    with pytest.raises(StatisticsError, match=r"sums of shapes \{'target': \(4, 4\), 'target_sum': \(4,\)\} "
                                              r"do not fit this accumulator \(6 and 3 channels\)"):
        CrossMoment(6, 3).load_sums(wrong)


def test_cross_moment_errors_name_the_bad_signal():
    x, xt = torch.randn(4, 3), torch.randn(4, 2)
    bad = xt.clone()
    bad[0, 1] = float("inf")
    with pytest.raises(StatisticsError) as err:
        CrossMoment().update(x, bad)
    assert str(err.value) == ("the pruned network's signal x~: 1 of 8 activation values are NaN or Inf; "
                              "check the input normalisation (data.*.mean/std), that the checkpoint matches "
                              "the architecture, and that the model runs in eval mode")
    bad = x.clone()
    bad[0, :2] = float("nan")
    with pytest.raises(StatisticsError, match="^the original network's signal x: 2 of 12 activation values"):
        CrossMoment().update(bad, xt)
    with pytest.raises(StatisticsError, match=r"the two signals must come from the same inputs: x has shape "
                                              r"\(4, 3\) and x~ \(5, 2\)"):
        CrossMoment().update(x, torch.randn(5, 2))
    acc = CrossMoment().update(x, xt)
    with pytest.raises(StatisticsError, match="^the pruned network's signal x~: expected 2 channels, got a "
                                              "batch with 3"):
        acc.update(x, x)
    with pytest.raises(StatisticsError, match="read before any update: run the 'observe' step"):
        CrossMoment().cross


@pytest.mark.parametrize("n, tile", [(100, 512), (1100, 512), (700, 100)])  # one tile, 2 tiles, 7 tiles
def test_sym_addmm_gives_the_whole_symmetric_product(n, tile):
    """Only the lower block triangle is multiplied and the rest mirrored in squares of 128: every
    entry must still be left @ right^T, here for a product that is symmetric (U V^T + V U^T)."""
    g = torch.Generator().manual_seed(n)
    u = torch.randn(n, 5, generator=g, dtype=torch.float64)
    v = torch.randn(n, 5, generator=g, dtype=torch.float64)
    start = torch.eye(n, dtype=torch.float64)
    out = sym_addmm(start.clone(), torch.cat([u, v], 1), torch.cat([v, u], 1), alpha=-0.5, tile=tile)
    torch.testing.assert_close(out, start - 0.5 * (u @ v.T + v @ u.T), atol=1e-13, rtol=0)


def test_accumulation_does_not_depend_on_how_rows_are_split(monkeypatch):
    g = torch.Generator().manual_seed(7)
    x, xt = torch.randn(5, 6, 4, 3, generator=g), torch.randn(5, 4, 4, 3, generator=g)
    whole = CrossMoment(max_positions=7, seed=1).update(x, xt)
    monkeypatch.setattr("specprune_cli.rows._CHUNK_ELEMENTS", 40)  # 1 sample (7 rows x 10 values) per piece
    pieces = CrossMoment(max_positions=7, seed=1).update(x, xt)
    flat = CrossMoment(channel_dim=-1).update(x.permute(0, 2, 3, 1), xt.permute(0, 2, 3, 1))  # 4 rows a piece
    assert pieces.count == whole.count == 35 and flat.count == 60
    torch.testing.assert_close(pieces.cross, whole.cross, atol=1e-14, rtol=1e-13)
    torch.testing.assert_close(pieces.source_mean, whole.source_mean, atol=1e-14, rtol=1e-13)
    rx, rt = _rows(x), _rows(xt)
    torch.testing.assert_close(flat.cross, rx.T @ rt / 60, atol=1e-14, rtol=1e-13)


def test_finish_turns_the_sums_into_the_moments_in_place_with_the_same_values():
    """After finish() the properties return the accumulator's own tensors (no copy per read), bit for bit
    what they returned before, and more rows are refused with a message that says what to do."""
    g = torch.Generator().manual_seed(3)
    acc = CrossMoment(300, 200)  # 3 x 2 cache tiles, not square
    acc.update(torch.randn(64, 300, generator=g), torch.randn(64, 200, generator=g))
    names = ("source", "cross", "target", "source_mean", "target_mean")
    before = {name: getattr(acc, name) for name in names}
    assert acc.finish() is acc
    for name in names:
        assert torch.equal(getattr(acc, name), before[name]), name
        assert getattr(acc, name).data_ptr() == getattr(acc, name).data_ptr(), name  # the same storage
    assert torch.equal(acc.target, acc.target.T) and acc.count == 64
    for call in (lambda: acc.update(torch.ones(2, 300), torch.ones(2, 200)), acc.sums,
                 lambda: CrossMoment().merge(acc)):
        with pytest.raises(StatisticsError, match=r"after finish\(\).*accumulate in a fresh one"):
            call()


def test_symmetrise_in_place_gives_the_values_of_the_mean_with_the_transpose():
    g = torch.Generator().manual_seed(4)
    for n in (5, 128, 300):  # one tile, exactly one, a ragged last one
        s = torch.randn(n, n, generator=g, dtype=torch.float64)
        want = 0.5 * (s + s.T)
        assert torch.equal(symmetrise_(s), want)

"""The Philox noise stream: Random123 known answers, per-sample independence from batch layout,
and the first two moments."""

import torch

from dps_fast.noise import STREAM_INIT, STREAM_STEP, philox4x32, philox_normal, seeds_from


def _t(v):
    return torch.tensor([v], dtype=torch.int64)


def test_philox_known_answers():
    # Random123 kat_vectors for philox4x32_10
    z = _t(0)
    assert [int(v) for v in philox4x32(z, z, z, z, z, z)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    f = _t(0xFFFFFFFF)
    assert [int(v) for v in philox4x32(f, f, f, f, f, f)] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    out = philox4x32(_t(0x243F6A88), _t(0x85A308D3), _t(0x13198A2E), _t(0x03707344), _t(0xA4093822), _t(0x299F31D0))
    assert [int(v) for v in out] == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


def test_rows_depend_only_on_their_seed():
    seeds = torch.tensor([3, 2**40 + 7, 11], dtype=torch.int64)
    z = philox_normal(seeds, 50, step=9)
    torch.testing.assert_close(philox_normal(seeds[1:2], 50, step=9)[0], z[1], rtol=0, atol=0)
    assert not torch.equal(z[0], philox_normal(seeds[:1], 50, step=8)[0])
    assert not torch.equal(z[0], philox_normal(seeds[:1], 50, step=9, stream=STREAM_INIT)[0])
    # float64 and float32 draws come from the same words
    torch.testing.assert_close(philox_normal(seeds, 50, 9, STREAM_STEP, torch.float64).float(), z, rtol=1e-5, atol=1e-5)


def test_moments():
    n = 10**6
    z = philox_normal(torch.tensor([123], dtype=torch.int64), n, step=0, dtype=torch.float64)[0]
    # 5 sigma bounds: sd(mean) = 1/sqrt(n); sd(var estimate) = sqrt(2/n); E z^4 = 3
    assert abs(float(z.mean())) < 5 / n**0.5
    assert abs(float(z.var()) - 1) < 5 * (2 / n) ** 0.5
    assert abs(float((z**4).mean()) - 3) < 5 * (96 / n) ** 0.5


def test_seeds_from():
    a, b = seeds_from(None, 5, seed=42), seeds_from(None, 8, seed=42)
    assert torch.equal(a, b[:5]) and len(set(b.tolist())) == 8 and (b >= 0).all()
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(seeds_from(g1, 4), seeds_from(g2, 4))


def test_mulhilo_matches_python_integers():
    from dps_fast.noise import PHILOX_A, PHILOX_B, _mulhilo

    g = torch.Generator().manual_seed(0)
    b = torch.cat([torch.tensor([0, 1, 2**31, 2**32 - 1], dtype=torch.int64),
                   torch.randint(0, 2**32, (4096,), generator=g, dtype=torch.int64)])
    for a in (PHILOX_A, PHILOX_B):
        hi, lo = _mulhilo(a, b)
        assert hi.tolist() == [(int(v) * a) >> 32 for v in b]
        assert lo.tolist() == [(int(v) * a) & 0xFFFFFFFF for v in b]

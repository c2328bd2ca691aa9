"""The Philox noise stream: Random123 known answers for the rounds, known answers for the
normals of the four-per-call layout (computed independently here from Python integers and
``math``), per-sample independence from batch layout and size, and the first moments."""

import math

import pytest
import torch

from dps_fast.noise import STREAM_INIT, STREAM_STEP, _philox_pairs, philox4x32, philox_normal, seeds_from

M32 = 0xFFFFFFFF


def philox_py(ctr: tuple[int, ...], key: tuple[int, int]) -> list[int]:
    """Philox4x32-10 on Python integers (Salmon et al. 2011), independent of dps_fast.noise."""
    c, k = list(ctr), list(key)
    for _ in range(10):
        pb, pa = 0xCD9E8D57 * c[2], 0xD2511F53 * c[0]
        c = [(pb >> 32) ^ c[1] ^ k[0], pb & M32, (pa >> 32) ^ c[3] ^ k[1], pa & M32]
        k = [(k[0] + 0x9E3779B9) & M32, (k[1] + 0xBB67AE85) & M32]
    return c


def normals_py(seed: int, numel: int, step: int, stream: int) -> list[float]:
    """The documented layout, spelled out: element e is slot e % 4 of call (e // 4, step, stream, 0)
    keyed by the seed's words; slots (0, 1) = rho cos, rho sin of (r0, r1), slots (2, 3) of (r2, r3)."""
    out = []
    for e in range(numel):
        r = philox_py((e // 4, step & M32, stream, 0), (seed & M32, (seed >> 32) & M32))
        ra, rb = r[2 * ((e % 4) // 2)], r[2 * ((e % 4) // 2) + 1]
        rho = math.sqrt(-2.0 * math.log(((ra >> 8) + 1) / 2**24))
        theta = 2.0 * math.pi * (rb >> 8) / 2**24
        out.append(rho * (math.cos(theta) if e % 2 == 0 else math.sin(theta)))
    return out


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


def test_philox_rounds_match_python_integers():
    g = torch.Generator().manual_seed(3)
    words = torch.randint(0, 2**32, (64, 6), generator=g, dtype=torch.int64)
    got = philox4x32(*words.T)
    for i in range(64):
        w = [int(v) for v in words[i]]
        assert [int(t[i]) for t in got] == philox_py(tuple(w[:4]), (w[4], w[5]))


# Pinned values of the four-per-call layout (from normals_py; any change to the stream fails here)
KAT_NORMALS = [
    (0x0123456789ABCDEF, 999, STREAM_STEP,
     [-1.3069943730768523, 0.9577090626517656, -0.9165375377675202, -1.4108760425818172,
      -1.1265769417045421, -0.7231372668166558]),
    (7, 0, STREAM_INIT, [0.5599220768351993, 1.0453331600835694, 0.23622130429695182, 1.509535732153735,
                         0.28697657575072594]),
]


@pytest.mark.parametrize(("seed", "step", "stream", "want"), KAT_NORMALS, ids=["6-elements", "5-elements-init"])
def test_normal_known_answers(seed, step, stream, want):
    """float64 normals equal the layout computed from Python integers with math.log/cos/sin (the
    library's float64 log/cos/sin differ from libm's by at most an ulp), and the pinned values."""
    got = philox_normal(torch.tensor([seed]), len(want), step, stream, torch.float64)[0].tolist()
    ref = normals_py(seed, len(want), step, stream)
    assert ref == pytest.approx(want, rel=0, abs=1e-15)
    assert got == pytest.approx(ref, rel=0, abs=4e-15)  # |z| < 6: a few ulp of 8
    # float32: same words, log/cos/sin in float32 (a few float32 ulp of |z| <= 6)
    got32 = philox_normal(torch.tensor([seed]), len(want), step, stream, torch.float32)[0].tolist()
    assert got32 == pytest.approx(ref, rel=0, abs=4e-6)


@pytest.mark.parametrize("numel", [1, 2, 3, 4, 5, 7, 8, 33])
def test_normals_follow_the_documented_layout(numel):
    """Every element of several samples (64-bit and negative seeds, the largest step) against the
    Python-integer layout: tails (numel % 4 != 0) drop unused slots and never shift elements."""
    seeds = [0, 2**40 + 12345, 2**62 - 1, -3]
    for step, stream in ((0, STREAM_STEP), (2**32 - 1, STREAM_INIT), (2**33 + 5, STREAM_STEP)):
        got = philox_normal(torch.tensor(seeds), numel, step, stream, torch.float64)
        for n, seed in enumerate(seeds):
            assert got[n].tolist() == pytest.approx(normals_py(seed, numel, step, stream), rel=0, abs=4e-15)


def test_element_values_do_not_depend_on_numel():
    """Element e is a function of (seed, step, stream, e) only: a longer draw extends a shorter one."""
    seeds = torch.tensor([5, 2**50 + 1], dtype=torch.int64)
    full = philox_normal(seeds, 41, 3)
    for numel in (1, 6, 13, 40):
        assert torch.equal(philox_normal(seeds, numel, 3), full[:, :numel])


def test_stacked_rounds_equal_philox4x32():
    """philox_normal's lane-stacked rounds give philox4x32's words bit for bit (int step, device
    step tensor, streams, 64-bit keys)."""
    seeds = torch.tensor([0, 1, 2**40 + 5, 2**62 - 1, -3], dtype=torch.int64)
    c0 = torch.arange(37, dtype=torch.int64)
    for step in (0, 7, 2**32 - 1):
        for stream in (STREAM_STEP, STREAM_INIT, 2):
            want = philox4x32(c0.view(1, -1), torch.full((1, 1), step), torch.full((1, 1), stream),
                              torch.zeros(1, 1, dtype=torch.int64), (seeds & M32).view(-1, 1),
                              ((seeds >> 32) & M32).view(-1, 1))
            want = [w.expand(len(seeds), len(c0)) for w in want]
            for st in (step, torch.tensor([step])):
                ra, rb = _philox_pairs(c0, st, stream, seeds & M32, (seeds >> 32) & M32)
                assert torch.equal(ra[0], want[0]) and torch.equal(rb[0], want[1])
                assert torch.equal(ra[1], want[2]) and torch.equal(rb[1], want[3])


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
    # the four slots of a call are independent N(0, 1): cos/sin of one pair are uncorrelated and
    # the slot means and variances agree. Each slot has n/4 draws: sd(correlation) = 1/sqrt(n/4).
    slots = z.view(-1, 4)
    corr = torch.corrcoef(slots.T)
    off = corr[~torch.eye(4, dtype=torch.bool)]
    assert off.abs().max() < 5 / (n / 4) ** 0.5
    assert (slots.mean(0).abs() < 5 / (n / 4) ** 0.5).all()
    assert ((slots.var(0) - 1).abs() < 5 * (2 / (n / 4)) ** 0.5).all()
    # rho^2 = z_cos^2 + z_sin^2 of one pair is chi^2 with 2 dof = Exp(1/2): mean 2, sd 2
    r2 = slots[:, 0] ** 2 + slots[:, 1] ** 2
    assert abs(float(r2.mean()) - 2) < 5 * 2 / (n / 4) ** 0.5


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

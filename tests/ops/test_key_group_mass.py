"""Key-group mass: per query, the attention probability on the keys of each group (DAAM's per-token
maps without the map), on every kernel path, against a float64 oracle written here from
torch.softmax and a one-hot matrix (not the op's reference)."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffcirc.ops import STAT_NAMES, attention, extension, reference_attention

from helpers.attention_cases import DTYPES, full_case, rand

# Like the other statistics (helpers.attention_cases.assert_stats_close).
MASS_ATOL = {torch.float32: 2e-4, torch.float16: 1e-3, torch.bfloat16: 1e-3}


def softmax_probabilities(q, k, scale=None, key_padding_mask=None):
    """float64 attention probabilities (B, H, Nq, Nk) by torch.softmax; 0 on rows that see no key."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale
    if key_padding_mask is None:
        return torch.softmax(s, dim=-1)
    keep = key_padding_mask[:, None, None, :]
    p = torch.softmax(s.masked_fill(~keep, -math.inf), dim=-1)
    return torch.where(keep.any(dim=-1, keepdim=True), p, torch.zeros_like(p))  # softmax of all -inf is NaN


def group_mass_oracle(p, key_groups, n_groups):
    """p @ one_hot(key_groups): (B, H, Nq, G); an id outside [0, G) matches no column."""
    one_hot = (key_groups.long()[..., None] == torch.arange(n_groups, device=p.device)).double()  # (B, Nk, G)
    return torch.matmul(p, one_hot[:, None])


def assert_mass_close(got, want, dtype):
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.isfinite(got).all()
    err = (got.double() - want).abs().max().item() if want.numel() else 0.0
    assert torch.allclose(got.double(), want, atol=MASS_ATOL[dtype], rtol=1e-4), err


def key_groups_of(layout, B, Nk, G, device="cpu", generator=None):
    """(B, Nk) group ids in [-1, G) laid out as prompts and regions are."""
    kg = torch.full((B, Nk), -1, dtype=torch.long)
    n = min(G, Nk)
    if layout == "tokens first":  # Flux: text keys (each its own group) before the image keys
        kg[:, :n] = torch.arange(n)
    elif layout == "tokens across a key block":  # the CPU kernel's blocks are 512 keys
        start = max(0, min(450, Nk - n))
        kg[:, start:start + n] = torch.arange(n)
    elif layout == "tokens last":  # SD3: image keys first
        kg[:, Nk - n:] = torch.arange(n)
    elif layout == "words":  # several tokens per group, in order
        kg[:, :] = torch.arange(Nk) // 3 % G
    elif layout == "random":
        kg = torch.randint(-1, G, (B, Nk), generator=generator)
    elif layout != "none":
        raise ValueError(layout)
    return kg.to(device)


LAYOUTS = ("tokens first", "tokens across a key block", "tokens last", "words", "random")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_matches_softmax_oracle(dtype, layout, kernel):
    # Nk = 700: two CPU key blocks (the row max moves between them for about a quarter of the rows,
    # so the accumulators must follow it), 22 CUDA key tiles; masked keys anywhere
    B, H, Nq, Nk, D, G = 2, 2, 70, 700, 40, 96
    q, k, v = (rand(B, H, n, D, dtype=dtype, device=kernel) for n in (Nq, Nk, Nk))
    mask = torch.rand(B, Nk, device=kernel) > 0.2
    kg = key_groups_of(layout, B, Nk, G, kernel)
    r = attention(q, k, v, key_padding_mask=mask, stats=("key_group_mass",), key_groups=kg, n_groups=G)
    assert r.key_group_mass.shape == (B, H, Nq, G) and r.key_group_mass.device.type == kernel
    want = group_mass_oracle(softmax_probabilities(q, k, key_padding_mask=mask), kg, G)
    assert_mass_close(r.key_group_mass, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_accumulators_follow_a_max_that_jumps(dtype, kernel):
    # logits a_i * (noise_j + block level of j): row i's max grows by about a_i from each 512-key
    # block to the next (0.5 .. 15 nats, past the CPU kernel's rescale gap of 8 for half the rows;
    # falling for negative a_i), with grouped keys in every block, so the mass gathered early must be
    # carried over every such jump
    Nq, Nk, G = 48, 1536, 11
    a = torch.cat((torch.linspace(0.5, 15.0, Nq - 8), torch.linspace(-4.0, -0.5, 8)))
    q = torch.zeros(1, 1, Nq, 8)
    q[0, 0, :, 0] = a
    k = torch.randn(1, 1, Nk, 8) * 0.1
    k[0, 0, :, 0] += torch.arange(Nk) // 512
    q, k = q.to(kernel, dtype), k.to(kernel, dtype)
    v = rand(1, 1, Nk, 8, dtype=dtype, device=kernel)
    kg = key_groups_of("words", 1, Nk, G, kernel)
    r = attention(q, k, v, scale=1.0, stats=("key_group_mass",), key_groups=kg, n_groups=G)
    want = group_mass_oracle(softmax_probabilities(q, k, scale=1.0), kg, G)
    assert_mass_close(r.key_group_mass, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_t5_prompt_of_512_tokens_and_a_single_group(dtype, kernel):
    # G = 512 (T5): every text token its own group ahead of the image keys, the prompt's padding
    # masked; then G = 1 with every key in it: the mass is 1 on every row
    B, H, Nq, Nt, Ni, D = 1, 2, 40, 512, 600, 32
    q, k, v = (rand(B, H, n, D, dtype=dtype, device=kernel) for n in (Nq, Nt + Ni, Nt + Ni))
    kg = key_groups_of("tokens first", B, Nt + Ni, Nt, kernel)
    mask = torch.ones(B, Nt + Ni, dtype=torch.bool, device=kernel)
    mask[:, 300:Nt] = False  # a 300-token prompt padded to 512
    r = attention(q, k, v, key_padding_mask=mask, stats=("key_group_mass",), key_groups=kg, n_groups=Nt)
    p = softmax_probabilities(q, k, key_padding_mask=mask)
    assert_mass_close(r.key_group_mass, group_mass_oracle(p, kg, Nt), dtype)
    assert torch.all(r.key_group_mass[..., 300:] == 0)  # padding tokens get nothing, exactly

    r = attention(q, k, v, stats=("key_group_mass",), key_groups=torch.zeros_like(kg), n_groups=1)
    assert r.key_group_mass.shape == (B, H, Nq, 1)
    assert torch.allclose(r.key_group_mass, torch.ones_like(r.key_group_mass), atol=1e-5)


def test_fully_masked_rows_empty_groups_and_ungrouped_keys(kernel):
    B, H, Nq, Nk, D, G = 3, 2, 20, 600, 16, 8
    q, k, v = (rand(B, H, n, D, device=kernel) for n in (Nq, Nk, Nk))
    kg = torch.randint(0, 6, (B, Nk), device=kernel)  # groups 6 and 7 stay empty
    kg[:, ::5] = -1
    mask = torch.rand(B, Nk, device=kernel) > 0.5
    mask[1] = False  # element 1 sees no key
    r = attention(q, k, v, key_padding_mask=mask, stats=("key_group_mass", "lse"), key_groups=kg, n_groups=G)
    m = r.key_group_mass
    assert torch.isfinite(m).all()
    assert torch.all(m[1] == 0) and torch.all(torch.isneginf(r.lse[1]))
    assert torch.all(m[..., 6:] == 0)
    assert_mass_close(m, group_mass_oracle(softmax_probabilities(q, k, key_padding_mask=mask), kg, G), torch.float32)
    # every key ungrouped: all zero; none at all (Nk = 0): all zero
    r = attention(q, k, v, stats=("key_group_mass",), key_groups=torch.full_like(kg, -1), n_groups=G)
    assert torch.all(r.key_group_mass == 0)
    r = attention(q, k[:, :, :0], v[:, :, :0], stats=("key_group_mass",), key_groups=kg[:, :0], n_groups=G)
    assert r.key_group_mass.shape == (B, H, Nq, G) and torch.all(r.key_group_mass == 0)


@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_other_outputs_and_interventions_unaffected(dtype, kernel):
    # asking for key-group mass changes no other output, bit for bit; head_scale and a replacement
    # change out, never the probabilities, so the mass is bit-equal with and without them
    B, H, Nq, Nk, D = 2, 3, 50, 530, 24
    q, k, v, kw = full_case(B, H, Nq, Nk, D, D, dtype, device=kernel)
    kg = key_groups_of("random", B, Nk, 13, kernel)
    plain = attention(q, k, v, **kw)
    both = attention(q, k, v, **{**kw, "stats": (*STAT_NAMES, "key_group_mass")}, key_groups=kg, n_groups=13)
    for name in ("out", *STAT_NAMES):
        torch.testing.assert_close(getattr(both, name), getattr(plain, name), rtol=0, atol=0, msg=name)
    hs = torch.rand(B, H, device=kernel)
    hs[0, 1] = 0.0
    rep = rand(1, H, 1, D, device=kernel)
    ablated = attention(q, k, v, **{**kw, "stats": ("key_group_mass",)}, key_groups=kg, n_groups=13,
                        head_scale=hs, head_replacement=rep)
    assert torch.equal(ablated.key_group_mass, both.key_group_mass)
    ref = reference_attention(q, k, v, **kw, head_scale=hs, head_replacement=rep)
    assert (ablated.out.double() - ref.out).abs().max().item() <= (2e-5 if dtype == torch.float32 else 2e-2)
    p = softmax_probabilities(q, k, key_padding_mask=kw["key_padding_mask"])
    assert_mass_close(ablated.key_group_mass, group_mass_oracle(p, kg, 13), dtype)


def test_label_mass_is_group_mass_at_the_query_label(kernel):
    # two paths through the kernels, one statistic: label mass (one accumulator) and key-group mass
    # over the key labels (one group per label) read at the query's own label
    B, H, Nq, Nk, D, n_labels = 2, 2, 60, 700, 32, 5
    q, k, v = (rand(B, H, n, D, device=kernel) for n in (Nq, Nk, Nk))
    q_labels = torch.randint(0, n_labels, (B, Nq), device=kernel)
    k_labels = torch.randint(0, n_labels, (B, Nk), device=kernel)
    mask = torch.rand(B, Nk, device=kernel) > 0.3
    r = attention(q, k, v, key_padding_mask=mask, stats=("label_mass", "key_group_mass"), labels=(q_labels, k_labels),
                  key_groups=k_labels, n_groups=n_labels)
    at_own_label = r.key_group_mass.gather(-1, q_labels[:, None, :, None].expand(B, H, Nq, 1)).squeeze(-1)
    assert torch.allclose(at_own_label, r.label_mass, atol=1e-6)
    # and the rows of the mass sum to 1: every key has a label
    assert torch.allclose(r.key_group_mass.sum(-1), torch.ones_like(r.label_mass), atol=1e-5)


def test_non_finite_rows_are_nan_in_every_group(kernel):
    # a row that meets a NaN logit of an unmasked key is NaN in every group, like out; NaN in masked
    # keys (padding garbage) changes nothing
    B, H, Nq, Nk, D, G = 2, 2, 20, 600, 16, 6
    q, k, v = (rand(B, H, n, D, device=kernel) for n in (Nq, Nk, Nk))
    kg = torch.randint(-1, G, (B, Nk), device=kernel)
    mask = torch.ones(B, Nk, dtype=torch.bool, device=kernel)
    mask[1, 550:] = False
    clean_k = k.clone()
    q[0, 0, 3, 0] = float("nan")
    k[1, :, 550:] = float("nan")
    r = attention(q, k, v, key_padding_mask=mask, stats=("key_group_mass",), key_groups=kg, n_groups=G)
    m = r.key_group_mass
    assert torch.isnan(m[0, 0, 3]).all()
    bad = torch.zeros(B, H, Nq, dtype=torch.bool, device=kernel)
    bad[0, 0, 3] = True
    assert torch.isfinite(m[~bad]).all()
    clean = attention(q.nan_to_num(), clean_k, v, key_padding_mask=mask, stats=("key_group_mass",), key_groups=kg,
                      n_groups=G).key_group_mass
    assert torch.equal(m[1], clean[1])


@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_strided_inputs_and_integer_dtypes_of_key_groups(id_dtype, kernel):
    # q, k, v as diffusers hands them ((B, N, H, D) memory viewed as (B, H, N, D)) and key_groups a
    # transposed view, in any integer dtype
    B, H, Nq, Nk, D, G = 2, 3, 40, 520, 32, 9
    q = rand(B, Nq, H, D, device=kernel).transpose(1, 2)
    k, v = (rand(B, Nk, H, D, device=kernel).transpose(1, 2) for _ in range(2))
    kg = torch.randint(-1, G, (Nk, B), device=kernel).to(id_dtype).t()
    if id_dtype == torch.uint8:
        kg = torch.randint(0, G, (Nk, B), device=kernel).to(id_dtype).t()
    assert not kg.is_contiguous()
    r = attention(q, k, v, stats=("key_group_mass",), key_groups=kg, n_groups=G)
    assert_mass_close(r.key_group_mass, group_mass_oracle(softmax_probabilities(q, k), kg, G), torch.float32)


def test_direct_op_calls_put_out_of_range_ids_in_no_group(kernel):
    # the kernels never read or write outside the output for ids the wrapper would refuse (it does not
    # check on a GPU): such keys count in no group
    B, H, Nq, Nk, D, G = 1, 2, 30, 600, 16, 4
    q, k, v = (rand(B, H, n, D, device=kernel) for n in (Nq, Nk, Nk))
    kg = torch.randint(-1, G, (B, Nk), dtype=torch.int32, device=kernel)
    wild = kg.clone()
    wild[:, ::7] = G
    wild[:, 3::7] = -5
    wild[:, 5::7] = 2**31 - 1
    kept = torch.where((wild >= 0) & (wild < G), wild, -1)
    got = torch.ops.diffcirc.attention(q, k, v, 0.25, None, None, None, [], None, None, False, False, False, wild, G)[5]
    want = torch.ops.diffcirc.attention(q, k, v, 0.25, None, None, None, [], None, None, False, False, False, kept, G)[5]
    assert torch.equal(got, want)
    assert_mass_close(got, group_mass_oracle(softmax_probabilities(q, k, scale=0.25), kept, G), torch.float32)


def test_reference_and_fallback_match_the_oracle(monkeypatch):
    # the op's reference computes both masses from one function; as the fallback it must agree too
    B, H, Nq, Nk, D, G = 2, 2, 12, 40, 8, 7
    q, k, v = (rand(B, H, n, D) for n in (Nq, Nk, Nk))
    mask = torch.rand(B, Nk) > 0.3
    mask[1] = False
    kg = torch.randint(-1, G, (B, Nk))
    values = torch.tensor([-3, 7, 100])  # labels are any integers, not group ids
    labels = (values[torch.randint(0, 3, (B, Nq))], values[torch.randint(0, 3, (B, Nk))])
    p = softmax_probabilities(q, k, key_padding_mask=mask)
    want = group_mass_oracle(p, kg, G)
    same = (labels[0][:, None, :, None] == labels[1][:, None, None, :]).double()
    want_label = (p * same).sum(-1)
    kw = dict(key_padding_mask=mask, stats=("key_group_mass", "label_mass"), labels=labels, key_groups=kg, n_groups=G)
    ref = reference_attention(q, k, v, **kw)
    assert ref.key_group_mass.dtype == torch.float64
    assert torch.allclose(ref.key_group_mass, want, atol=1e-12)
    assert torch.allclose(ref.label_mass, want_label, atol=1e-12)
    monkeypatch.setattr(extension, "available", lambda: False)
    fallback = attention(q, k, v, **kw)
    assert fallback.key_group_mass.dtype == torch.float32
    assert torch.allclose(fallback.key_group_mass.double(), want, atol=1e-6)
    assert torch.allclose(fallback.label_mass.double(), want_label, atol=1e-6)


# ---- summed over heads ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["tokens first", "random"])
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
def test_summed_over_heads_matches_the_oracle_summed(dtype, layout, kernel):
    # Nq = 300: three CPU query blocks, whose tasks for the four heads add into the same output rows
    B, H, Nq, Nk, D, G = 2, 4, 300, 700, 32, 77
    q, k, v = (rand(B, H, n, D, dtype=dtype, device=kernel) for n in (Nq, Nk, Nk))
    mask = torch.rand(B, Nk, device=kernel) > 0.2
    mask[1, :] = False
    mask[1, :5] = True  # element 1 sees five keys only
    kg = key_groups_of(layout, B, Nk, G, kernel)
    kw = dict(key_padding_mask=mask, stats=("key_group_mass",), key_groups=kg, n_groups=G)
    summed = attention(q, k, v, **kw, key_group_mass_heads="sum").key_group_mass
    assert summed.shape == (B, 1, Nq, G)
    want = group_mass_oracle(softmax_probabilities(q, k, key_padding_mask=mask), kg, G).sum(1, keepdim=True)
    assert summed.dtype == torch.float32 and torch.isfinite(summed).all()
    assert torch.allclose(summed.double(), want, atol=H * MASS_ATOL[dtype], rtol=1e-4)
    each = attention(q, k, v, **kw).key_group_mass
    assert torch.allclose(summed, each.sum(1, keepdim=True), atol=1e-5, rtol=1e-5)


def test_summed_over_heads_on_several_threads_matches_the_oracle_summed(kernel, several_threads):
    # 2 x 4 heads x 3 query blocks = 24 tasks over 4 threads: tasks of the four heads of one query
    # block run at once on different threads and add into the same rows, each under its block's lock
    B, H, Nq, Nk, D, G = 2, 4, 300, 700, 32, 77
    q, k, v = (rand(B, H, n, D, device=kernel) for n in (Nq, Nk, Nk))
    mask = torch.rand(B, Nk, device=kernel) > 0.2
    kg = key_groups_of("random", B, Nk, G, kernel)
    kw = dict(key_padding_mask=mask, stats=("key_group_mass",), key_groups=kg, n_groups=G)
    summed = attention(q, k, v, **kw, key_group_mass_heads="sum").key_group_mass
    torch.set_num_threads(1)  # the oracle: on one thread, like the rest of these tests
    want = group_mass_oracle(softmax_probabilities(q, k, key_padding_mask=mask), kg, G).sum(1, keepdim=True)
    assert torch.allclose(summed.double(), want, atol=H * MASS_ATOL[torch.float32], rtol=1e-4)


def test_summed_over_heads_keeps_empty_and_poisoned_rows(kernel):
    # a fully masked element sums to 0; a row poisoned in one head is NaN in its sum, no other row is
    B, H, Nq, Nk, D, G = 2, 3, 140, 600, 16, 6
    q, k, v = (rand(B, H, n, D, device=kernel) for n in (Nq, Nk, Nk))
    kg = torch.randint(-1, G, (B, Nk), device=kernel)
    mask = torch.ones(B, Nk, dtype=torch.bool, device=kernel)
    mask[1] = False
    q[0, 2, 130, 0] = float("nan")
    m = attention(q, k, v, key_padding_mask=mask, stats=("key_group_mass",), key_groups=kg, n_groups=G,
                  key_group_mass_heads="sum").key_group_mass
    assert torch.all(m[1] == 0)
    assert torch.isnan(m[0, 0, 130]).all()
    rest = torch.ones(Nq, dtype=torch.bool)
    rest[130] = False
    assert torch.isfinite(m[0, 0, rest]).all()


def test_summed_over_heads_in_the_reference_and_the_fallback(monkeypatch):
    B, H, Nq, Nk, D, G = 2, 3, 12, 40, 8, 7
    q, k, v = (rand(B, H, n, D) for n in (Nq, Nk, Nk))
    kg = torch.randint(-1, G, (B, Nk))
    want = group_mass_oracle(softmax_probabilities(q, k), kg, G).sum(1, keepdim=True)
    kw = dict(stats=("key_group_mass",), key_groups=kg, n_groups=G, key_group_mass_heads="sum")
    assert torch.allclose(reference_attention(q, k, v, **kw).key_group_mass, want, atol=1e-12)
    monkeypatch.setattr(extension, "available", lambda: False)
    assert torch.allclose(attention(q, k, v, **kw).key_group_mass.double(), want, atol=1e-6)


def test_summed_over_heads_refusals(kernel):
    q, k, v = (rand(1, 2, 8, 8, device=kernel) for _ in range(3))
    kg = torch.zeros(1, 8, dtype=torch.int32, device=kernel)
    with pytest.raises(ValueError, match=r"key_group_mass_heads must be one of \('each', 'sum'\), got 'mean'"):
        attention(q, k, v, stats=("key_group_mass",), key_groups=kg, n_groups=1, key_group_mass_heads="mean")
    with pytest.raises(ValueError, match="key_group_mass_heads='sum' given but stats does not ask for 'key_group_mass'"):
        attention(q, k, v, stats=("entropy",), key_group_mass_heads="sum")
    with pytest.raises(ValueError, match="sum_group_heads is for key_group_mass"):
        torch.ops.diffcirc.attention(q, k, v, 0.25, None, None, None, [], None, None, False, False, False, None, 0,
                                     True)


# ---- property-based ----------------------------------------------------------------------------


@st.composite
def group_problems(draw):
    B, H = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    Nq, Nk = draw(st.integers(1, 40)), draw(st.integers(1, 1100))
    return dict(B=B, H=H, Nq=Nq, Nk=Nk, D=draw(st.integers(1, 48)), dtype=draw(st.sampled_from(list(DTYPES.values()))),
                G=draw(st.one_of(st.sampled_from([1, 2, 77, 512]), st.integers(1, 600))),
                layout=draw(st.sampled_from([*LAYOUTS, "none"])),
                mask=draw(st.sampled_from(["none", "random", "with_empty_rows", "prompt_padding"])),
                stats=tuple(sorted(draw(st.sets(st.sampled_from(STAT_NAMES))))),
                head_scale=draw(st.booleans()), transpose=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
                heads=draw(st.sampled_from(["each", "sum"])))


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(c=group_problems())
def test_fuzz_against_softmax_oracle(device, c):
    g = torch.Generator().manual_seed(c["seed"])
    B, H, Nq, Nk, D, G, dtype = c["B"], c["H"], c["Nq"], c["Nk"], c["D"], c["G"], c["dtype"]

    def make(n):
        shape = (B, n, H, D) if c["transpose"] else (B, H, n, D)
        t = torch.randn(shape, generator=g).to(device, dtype)
        return t.transpose(1, 2) if c["transpose"] else t

    q, k, v = make(Nq), make(Nk), make(Nk)
    kw = dict(stats=(*c["stats"], "key_group_mass"), key_groups=key_groups_of(c["layout"], B, Nk, G, device, g),
              n_groups=G, labels=tuple(torch.randint(0, 4, (B, n), generator=g).to(device) for n in (Nq, Nk)),
              grid=((1, Nq), (1, Nk)))
    mask = None
    if c["mask"] != "none":
        mask = torch.rand(B, Nk, generator=g) > 0.4
        if c["mask"] == "with_empty_rows":
            mask[0] = False
        if c["mask"] == "prompt_padding":
            mask[:] = True
            mask[:, Nk // 2:Nk // 2 + max(1, Nk // 4)] = False
        mask = mask.to(device)
        kw["key_padding_mask"] = mask
    if c["head_scale"]:
        kw["head_scale"] = torch.rand(B, H, generator=g).to(device)
        kw["head_replacement"] = torch.randn(1, H, 1, D, generator=g).to(device)
    r = attention(q, k, v, **kw, key_group_mass_heads=c["heads"])
    want = group_mass_oracle(softmax_probabilities(q, k, key_padding_mask=mask), kw["key_groups"], G)
    if c["heads"] == "sum":
        want = want.sum(1, keepdim=True)
        assert torch.allclose(r.key_group_mass.double(), want, atol=H * MASS_ATOL[dtype], rtol=1e-4)
    else:
        assert_mass_close(r.key_group_mass, want, dtype)
    ref = reference_attention(q, k, v, **kw)  # the other statistics keep their own accuracy alongside
    for name in c["stats"]:
        a, b = getattr(r, name).double(), getattr(ref, name)
        assert torch.equal(torch.isfinite(a), torch.isfinite(b)), name
        fin = torch.isfinite(b)
        assert torch.allclose(a[fin], b[fin], atol=2e-4 if dtype == torch.float32 else 1e-3, rtol=1e-4), name


# ---- only the CUDA kernel ---------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("D", [32, 64, 128, 256, 512])
def test_cuda_agrees_with_cpu_kernel(cuda_device, dtype, D):
    # every head-dim bucket's second pass (its own tile shape), Flux's layout, masks, padding rows
    B, H, Nq, Nt, Ni = 2, 2, 130, 77, 300
    q, k, v = (rand(B, H, n, D, dtype=dtype) for n in (Nq, Nt + Ni, Nt + Ni))
    kg = key_groups_of("tokens first", B, Nt + Ni, Nt)
    mask = torch.rand(B, Nt + Ni) > 0.2
    mask[1] = False
    kw = dict(key_padding_mask=mask, stats=("key_group_mass",), key_groups=kg, n_groups=Nt)
    on_cpu = attention(q, k, v, **kw).key_group_mass
    on_gpu = attention(q.to(cuda_device), k.to(cuda_device), v.to(cuda_device),
                       **{n: x.to(cuda_device) if torch.is_tensor(x) else x for n, x in kw.items()}).key_group_mass
    assert torch.allclose(on_gpu.cpu(), on_cpu, atol=2e-5 if dtype == torch.float32 else 1e-4, rtol=1e-4)
    summed = attention(q.to(cuda_device), k.to(cuda_device), v.to(cuda_device), key_group_mass_heads="sum",
                       **{n: x.to(cuda_device) if torch.is_tensor(x) else x for n, x in kw.items()}).key_group_mass
    assert summed.shape == (B, 1, Nq, Nt)
    assert torch.allclose(summed.cpu(), on_cpu.sum(1, keepdim=True), atol=4e-5 if dtype == torch.float32 else 2e-4,
                          rtol=1e-4)


@pytest.mark.cuda
def test_cuda_no_quadratic_buffer(cuda_device):
    # N = 8192 (one (N, N) float32 matrix per head is 256 MiB): key-group mass over 512 groups needs
    # only its outputs
    B, H, N, D, G = 1, 2, 8192, 64, 512
    q, k, v = (rand(B, H, N, D, dtype=torch.float16, device=cuda_device) for _ in range(3))
    kg = key_groups_of("tokens first", B, N, G, cuda_device)
    attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], stats=("key_group_mass",), key_groups=kg[:, :64], n_groups=G)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    r = attention(q, k, v, stats=("key_group_mass",), key_groups=kg, n_groups=G)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    outputs = r.out.numel() * r.out.element_size() + B * H * N * 4 + r.key_group_mass.numel() * 4
    assert peak <= outputs + (1 << 20) + kg.numel() * 4, (peak, outputs)

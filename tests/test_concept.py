"""Concept guidance arithmetic against independent per-sample numpy implementations of the spec."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from diffprobe.errors import InputError
from diffprobe.guidance import CFG, BatchContext, StepInfo, make_guider
from diffprobe.guidance.concept import ConceptGuidance, reject, row_quantile, top_quantile_mask
from diffprobe.guidance.concepts import get_extractor, lowest_noun_phrases, parse_concepts


def step(i: int, n: int = 50) -> StepInfo:
    return StepInfo(index=i, num_steps=n, timestep=1000.0 - 20 * i)


def np_reject(x, y):
    return x - (x @ y) / (y @ y) * y


def np_abscos(x, y):
    return abs(x @ y) / (np.linalg.norm(x) * np.linalg.norm(y))


def np_v0(preds: np.ndarray, wg=7.5, wc=7.5, eta_a=0.7, ub=0.8):
    """One sample, spec section 2 step 4 literally: preds (n+2, C, H, W) -> guided eps, similarities."""
    u, p, concepts = preds[0], preds[1], preds[2:]
    n = len(concepts)
    s_p = (p - u).ravel()
    s_k = [(c - u).ravel() for c in concepts]
    s_a = np_reject(s_p, sum(s_k))
    c_k = [wc * s for s in s_k]
    c_a = wc * s_a
    rho_k = [np_abscos(s_p, c) for c in c_k]
    rho_a = np_abscos(s_p, c_a)
    g = np.zeros_like(s_p)
    if rho_a < eta_a:
        ca = c_a.reshape(preds.shape[1], -1)
        tau = np.quantile(np.abs(ca), rho_a, axis=1)  # numpy 'linear' = torch.quantile's default
        g += np.where(np.abs(ca) >= tau[:, None], ca, 0).ravel()
    for k in range(n):
        perp = np_reject(c_k[k], s_p)
        if rho_k[k] < 1 / (n + 1):
            g += perp
        if rho_k[k] > ub:
            g -= perp
    out = u.ravel() + wg * s_p + g
    return out.reshape(u.shape), rho_k + [rho_a]


def test_helpers():
    x = torch.randn(3, 4, 37, generator=torch.Generator().manual_seed(0))
    q = torch.tensor([0.0, 0.37, 1.0])
    for b in range(3):
        torch.testing.assert_close(row_quantile(x, q)[b], torch.quantile(x[b], q[b].item(), dim=-1))
    a, y = torch.tensor([[3.0, 4.0, 1.0]]), torch.tensor([[1.0, 0.0, 0.0]])
    torch.testing.assert_close(reject(a, y), torch.tensor([[0.0, 4.0, 1.0]]))
    assert torch.equal(reject(a, torch.zeros(1, 3)), a)  # nothing to remove
    m = top_quantile_mask(torch.tensor([[[1.0, -4.0, 2.0, 3.0, -0.5]]]), 0.5)  # median |x| = 2
    assert m.tolist() == [[[0.0, -4.0, 2.0, 3.0, 0.0]]]


def test_v0_matches_reference_on_hand_built_scores():
    # s_P along e1; concept 1 orthogonal to it (rho = 0 < 1/3: added), concept 2 almost parallel
    # (rho > 0.8: its small orthogonal part is subtracted).
    shape = (2, 2, 2)
    u = np.zeros(shape)
    p = np.zeros(shape)
    p.flat[0] = 1.0
    c1 = np.zeros(shape)
    c1.flat[1] = 0.5
    c2 = np.zeros(shape)
    c2.flat[0], c2.flat[2] = 1.0, 0.1
    preds = np.stack([u, p, c1, c2])
    out, sims = np_v0(preds)
    g = ConceptGuidance(concepts="c one; c two")
    g.start(BatchContext(prompts=["p"], latent_size=(2, 2)))
    got = g.combine(torch.tensor(preds, dtype=torch.float32)[:, None], {}, step(0))
    np.testing.assert_allclose(got[0].numpy(), out, atol=1e-6)
    rec = g.records()[0]
    np.testing.assert_allclose(rec["steps"][0]["similarity"], sims, atol=1e-6)
    assert rec["steps"][0]["applied"][:2] == [1, -1]
    # by hand: subject 1 adds 7.5 * 0.5 on entry 1, subject 2 removes 7.5 * 0.1 on entry 2; the abstract
    # score s_P - proj(s_P on s_1 + s_2) has |cos| with s_P of about 0.15 < 0.7, so it is added masked.
    assert rec["concepts"] == ["c one", "c two"] and rec["subject_threshold"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("n", [1, 3])
def test_v0_batch_is_per_sample(n):
    gen = torch.Generator().manual_seed(n)
    b = 3
    base = torch.randn(1, b, 4, 6, 6, generator=gen)
    preds = base + 0.3 * torch.randn(n + 2, b, 4, 6, 6, generator=gen)  # correlated branches: mixed decisions
    preds[2] = preds[1] * 0.9 + 0.1 * preds[0] + 0.1 * torch.randn(b, 4, 6, 6, generator=gen)  # close to the prompt
    g = ConceptGuidance(concepts=[f"c{i}" for i in range(n)])
    g.start(BatchContext(prompts=["p"] * b, latent_size=(6, 6)))
    got = g.combine(preds, {}, step(3))
    decisions = set()
    for i in range(b):
        out, sims = np_v0(preds[:, i].double().numpy())
        np.testing.assert_allclose(got[i].numpy(), out, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(g.records()[i]["steps"][0]["similarity"], sims, atol=1e-5)
        decisions.update(g.records()[i]["steps"][0]["applied"])
    assert len(decisions) >= 2  # the random cases exercise more than one branch of the rules


def np_head(steps_preds, wg=7.5, wc=8.5, th_s=0.5, th_a=0.5, pct=0.9, alpha=0.5, beta=0.5, warm=5, window=5):
    """One sample over several steps, spec section 3 literally."""
    hist, mom, outs = [], None, []
    for i, preds in enumerate(steps_preds):
        u, p = preds[0], preds[1]
        c = preds.shape[1]

        def mask(x, c=c):
            xx = x.reshape(c, -1)
            tau = np.quantile(np.abs(xx), pct, axis=1)
            return np.where(np.abs(xx) >= tau[:, None], xx, 0).ravel()

        s_p = (p - u).ravel()
        s_k = [mask(k - u) for k in preds[2:]]
        s_a = mask(p - u)
        for s in s_k:
            s_a = np_reject(s_a, s)
        rho = [np_abscos(s_p, s) for s in s_k] + [np_abscos(s_p, s_a)]
        if mom is None:
            mom = [np.zeros_like(s_p) for _ in s_k]
        g = np.zeros_like(s_p)
        past = hist[max(0, i - window) : i]
        for k, s in enumerate(s_k):
            h = s + alpha * mom[k]
            mom[k] = beta * mom[k] + (1 - beta) * h
            if i > warm and past and np.mean([r[k] for r in past]) < th_s:
                g += h
        if i > warm and past and np.mean([r[-1] for r in past]) < th_a:
            g += -(s_p - s_a)
        hist.append(rho)
        outs.append((u.ravel() + wg * s_p + wc * g).reshape(u.shape))
    return outs


def test_head_mode_over_steps_matches_reference():
    gen = torch.Generator().manual_seed(7)
    steps = [torch.randn(4, 2, 4, 4, 4, generator=gen) for _ in range(9)]
    g = ConceptGuidance(concepts="a; b", mode="head")
    g.start(BatchContext(prompts=["p", "q"], latent_size=(4, 4)))
    got = [g.combine(s, {}, step(i, 9)) for i, s in enumerate(steps)]
    for b in range(2):
        ref = np_head([s[:, b].double().numpy() for s in steps])
        for i in range(9):
            np.testing.assert_allclose(got[i][b].numpy(), ref[i], rtol=1e-4, atol=1e-4)
    applied = [st["applied"] for st in g.records()[0]["steps"]]
    assert all(a == [0, 0, 0] for a in applied[:6])  # warm-up: nothing before step 6


def test_no_concepts_is_cfg_and_says_so():
    g = ConceptGuidance(concepts="")
    assert g.branches("a photo") == ["", "a photo"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        g.start(BatchContext(prompts=["a photo"], latent_size=(4, 4)))
    assert any("falling back to plain CFG" in str(w.message) for w in caught)
    preds = torch.randn(2, 1, 4, 4, 4)
    assert torch.equal(g.combine(preds, {}, step(0)), CFG(scale=7.5).combine(preds, {}, step(0)))
    assert g.records()[0]["fallback"].startswith("cfg")


def test_outside_the_window_is_cfg():
    preds = torch.randn(4, 1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    g = ConceptGuidance(concepts="a; b", warm_up=5)
    g.start(BatchContext(prompts=["p"], latent_size=(4, 4)))
    assert torch.equal(g.combine(preds, {}, step(2)), CFG().combine(preds[:2], {}, step(2)))


def test_concept_sources_and_errors():
    assert parse_concepts(" a red book ; a gold clock;; ") == ["a red book", "a gold clock"]
    g = make_guider("concept", concepts="a red book; a gold clock")
    assert g.branches("x") == ["", "x", "a red book", "a gold clock"]
    assert g.config()["concepts"] == ["a red book", "a gold clock"]
    with pytest.raises(InputError):
        make_guider("concept", mode="v3")
    with pytest.raises(InputError):
        make_guider("concept", subject_threshold="often")
    with pytest.raises(InputError):
        get_extractor("parser")
    custom = ConceptGuidance(extractor=lambda p: p.split(" and "))
    custom.branches("a cat and a dog")
    custom.branches("a cat")
    with pytest.raises(InputError, match="same number of concepts"):
        custom.start(BatchContext(prompts=["a cat and a dog", "a cat"], latent_size=(4, 4)))


class Node:
    def __init__(self, label, *children):
        self.label, self.children = label, list(children)


def leaf(pos, word):
    return Node(pos, Node(word))


def test_lowest_noun_phrases_on_a_parse_tree():
    # (S (NP a cat) (VP sits (PP on (NP (NP top) (PP of (NP a car))))))
    tree = Node(
        "ROOT",
        Node(
            "S",
            Node("NP", leaf("DT", "a"), leaf("NN", "cat")),
            Node(
                "VP",
                leaf("VBZ", "sits"),
                Node(
                    "PP",
                    leaf("IN", "on"),
                    Node(
                        "NP",
                        Node("NP", leaf("NN", "top")),
                        Node("PP", leaf("IN", "of"), Node("NP", leaf("DT", "a"), leaf("NN", "car"))),
                    ),
                ),
            ),
        ),
    )
    assert lowest_noun_phrases(tree) == ["a cat", "top", "a car"]


def test_spacy_noun_chunks():
    pytest.importorskip("spacy")
    try:
        extract = get_extractor("spacy")
        got = extract("a green bench and a red car")
    except InputError as err:  # model not installed in this environment
        pytest.skip(str(err))
    assert got == ["a green bench", "a red car"]
    g = ConceptGuidance()
    assert g.branches("a red book next to a gold clock") == [
        "",
        "a red book next to a gold clock",
        "a red book",
        "a gold clock",
    ]
    g.start(BatchContext(prompts=["a red book next to a gold clock"], latent_size=(4, 4)))
    assert g.records()[0]["concept_source"] == "spacy"

"""The mathematics of SAP (Algorithm 1) on a tiny model in fp64: exactness, derivatives, first-order identity."""
import pytest
import torch

from conftest import PAIRS, lora_model, pair_batch, task_batch
from safeprobe.data import SafetyPair
from safeprobe.data.tokenize import PairCollator, encode_pairs
from safeprobe.method.losses import response_loss
from safeprobe.method.sap.safety_loss import contrastive_safety_loss
from safeprobe.method.sap.probe import Probe
from safeprobe.method.weights import global_norm, perturbed
from safeprobe.method.sap.algorithm import perturbation, probe_gradient, safe_probe, safety_direction


def params_of(model):
    return [p for p in model.parameters() if p.requires_grad]


def weight_grad(model, probe, batch, V):
    with probe.active(V):
        return torch.autograd.grad(response_loss(model, batch), params_of(model))


def sap_weight_grad(model, probe, batch, pairs, eps, beta):
    params = params_of(model)
    s, _ = safety_direction(model, params, pairs)
    delta, _ = perturbation(params, s, eps, "absolute")
    g_V, _, _ = probe_gradient(model, probe, params, delta, batch, seed=0)
    return weight_grad(model, probe, batch, safe_probe(g_V, beta)), s


def test_zero_step_sizes_give_the_sft_gradient_exactly(llama64):
    model, tok = llama64
    probe, batch, pairs = Probe(model, "1,2"), task_batch(tok), pair_batch(tok)
    sft = weight_grad(model, probe, batch, None)
    for eps, beta in ((0.0, 0.05), (0.01, 0.0)):
        sap, _ = sap_weight_grad(model, probe, batch, pairs, eps, beta)
        assert all(torch.equal(a, b) for a, b in zip(sft, sap)), (eps, beta)
    nonzero, _ = sap_weight_grad(model, probe, batch, pairs, 0.01, 0.05)  # the check can fail
    assert not all(torch.equal(a, b) for a, b in zip(sft, nonzero))


def test_perturbed_passes_restore_every_parameter_bit_exactly():
    model, tok = lora_model(dtype=torch.float32, dropout=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = params_of(model)
    s, _ = safety_direction(model, params, pair_batch(tok))
    delta, eps = perturbation(params, s, 0.3, "relative")  # large, and not exactly representable
    assert eps > 0
    probe = Probe(model, "middle")
    probe_gradient(model, probe, params, delta, task_batch(tok), seed=3)
    with perturbed(params, delta):
        assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_probe_gradient_matches_central_finite_difference_of_l_su():
    # GPT-2 computes end to end in fp64 (Llama's RMSNorm rounds through fp32, a 1e-9 noise floor), and eval
    # mode removes its dropout, so the central difference converges as h^2.
    model, tok = lora_model("tiny-random-gpt2")
    model.eval()
    probe, batch, params = Probe(model, "0,2"), task_batch(tok), params_of(model)
    s, _ = safety_direction(model, params, pair_batch(tok))
    delta, _ = perturbation(params, s, 0.05, "absolute")
    g_V, loss, loss_pert = probe_gradient(model, probe, params, delta, batch, seed=0)

    def l_su(V):
        with torch.no_grad(), probe.active(V):
            clean = response_loss(model, batch)
            with perturbed(params, delta):
                return response_loss(model, batch) - clean

    h, gen, errors = 1e-5, torch.Generator().manual_seed(0), []
    for _ in range(4):
        u = [torch.randn(v.shape, generator=gen, dtype=torch.float64) for v in g_V]
        fd = (l_su([h * x for x in u]) - l_su([-h * x for x in u])) / (2 * h)
        analytic = sum((g.double() * x).sum() for g, x in zip(g_V, u))
        errors.append(abs(float(fd - analytic)) / abs(float(analytic)))
    print(f"finite-difference relative errors: {errors}")
    assert max(errors) < 1e-3, errors
    assert abs(float(l_su(None) - (loss_pert - loss))) < 1e-12  # the free L_su estimate is L_su at V = 0


def test_first_order_identity_sap_minus_sft_is_parallel_to_J_JT_s(llama64):
    model, tok = llama64
    model.set_attn_implementation("eager")  # the Jacobian needs double backward, which CPU SDPA lacks
    probe, batch = Probe(model, "1,3"), task_batch(tok)
    eps, beta = 1e-5, 1e-3
    sft = weight_grad(model, probe, batch, None)
    sap, s = sap_weight_grad(model, probe, batch, pair_batch(tok), eps, beta)
    diff = torch.cat([(a - b).flatten() for a, b in zip(sap, sft)])

    # J = d(grad_W L)/dV at V = 0 = the mixed second derivative of L. Computed independently of SAP's
    # finite difference of gradients, by double backward: J^T s_hat = grad_V <grad_W L, s_hat> and
    # J u = grad_W <grad_V L, u> (mixed partial derivatives commute).
    params = params_of(model)
    V = probe.zeros(batch["input_ids"], requires_grad=True)
    s_hat = [x / global_norm(s) for x in s]
    with probe.active(V):
        g_w = torch.autograd.grad(response_loss(model, batch), params, create_graph=True)
        jt_s = torch.autograd.grad(sum((g * d).sum() for g, d in zip(g_w, s_hat)), V)
        g_v = torch.autograd.grad(response_loss(model, batch), V, create_graph=True)
        j_jt_s = torch.autograd.grad(sum((g * u).sum() for g, u in zip(g_v, jt_s)), params)
    predicted = beta * eps * torch.cat([x.flatten() for x in j_jt_s])
    cosine = torch.nn.functional.cosine_similarity(diff, predicted, dim=0)
    print(f"first-order identity: cosine {float(cosine):.6f}, size ratio {float(diff.norm() / predicted.norm()):.4f}")
    assert cosine > 0.99, float(cosine)
    assert 0.5 < float(diff.norm() / predicted.norm()) < 2.0  # and of the predicted size


def test_one_sap_step_lowers_safety_loss_at_least_as_much_as_sft():
    margins = []
    for seed in range(5):
        model, tok = lora_model(seed=seed)
        probe, batch, pairs, params = Probe(model, "middle"), task_batch(tok), pair_batch(tok), params_of(model)
        lr = 1e-3
        sft = weight_grad(model, probe, batch, None)
        sap, _ = sap_weight_grad(model, probe, batch, pairs, eps=1e-4, beta=0.05)

        def safety_after(grads):
            with torch.no_grad(), perturbed(params, [-lr * g for g in grads]):
                return float(contrastive_safety_loss(model, pairs))
        margins.append(safety_after(sft) - safety_after(sap))
    print(f"L_safety(SFT step) - L_safety(SAP step) over seeds: {margins}")
    assert all(m >= 0 for m in margins), margins
    assert max(margins) > 0, margins


@pytest.mark.parametrize("kind", ["paper", "dpo"])
@pytest.mark.parametrize("shared", [False, True])
def test_a_safety_batch_in_chunks_gives_the_whole_batch_s(kind, shared):
    from safeprobe.method.sap.shared_prompt import SharedPromptPass
    model, tok = lora_model()
    model.eval()  # no dropout: one batch and its chunks must agree to rounding
    params = params_of(model)
    pairs = encode_pairs(tok, [SafetyPair((("user", p),), s, h) for p, s, h in PAIRS], 64).features
    whole = PairCollator(tok)(pairs)
    chunks = [PairCollator(tok)(pairs[:2]), PairCollator(tok)(pairs[2:])]  # unequal lengths and counts
    shared_pass = (lambda: SharedPromptPass()) if shared else (lambda: None)
    s_whole, loss_whole = safety_direction(model, params, whole, kind, shared_pass())
    s_chunks, loss_chunks = safety_direction(model, params, chunks, kind, shared_pass())
    assert torch.allclose(loss_chunks, loss_whole, rtol=1e-9, atol=0)
    error = global_norm([a - b for a, b in zip(s_chunks, s_whole)]) / global_norm(s_whole)
    assert global_norm(s_whole) > 0 and error < 1e-9, float(error)
    s_first, _ = safety_direction(model, params, chunks[:1], kind, shared_pass())  # the check can fail
    assert global_norm([a - b for a, b in zip(s_first, s_whole)]) / global_norm(s_whole) > 1e-3

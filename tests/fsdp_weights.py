"""Helper script for test_fsdp.py, run on 2 processes (gloo): the weight-space functions on FSDP2 shards give what
they give on the same model unsharded. Each check raises on failure; the last line printed is "OK"."""
import copy

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from safeprobe.data.tokenize import collator, encode
from safeprobe.data import Example
from safeprobe.method.base import all_finite
from safeprobe.method.losses import response_loss
from safeprobe.method.weights import (Scaled, global_dot, global_norm, gradient, is_sharded, like, local,
                                      perturbed, whole)
from safeprobe.model import apply_lora, load_model
from safeprobe.model.layers import decoder_layers

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model, tokenizer = load_model("tiny-random-llama")
model = apply_lora(model, r=4, alpha=8, dropout=0.0)
with torch.no_grad():  # non-zero B: every LoRA tensor has a gradient
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
reference = copy.deepcopy(model)  # the same weights, unsharded, on every rank
for layer in decoder_layers(model):
    fully_shard(layer)
fully_shard(model)
batch = collator(tokenizer)([encode(tokenizer, Example((("user", f"Is '{w}' good?"),), "yes"), 64)
                             for w in ("tea", "rain", "jazz")])  # the same batch on both ranks
sharded = [p for p in model.parameters() if p.requires_grad]
plain = [p for p in reference.parameters() if p.requires_grad]
assert is_sharded(sharded) and not is_sharded(plain) and len(sharded) == len(plain)


def close(a, b, what, tol=1e-5):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    err = float((a - b).norm() / max(float(b.norm()), 1e-30))
    assert err < tol, f"{what}: relative error {err:.2e}"


# gradient: a backward into the shards, averaged over ranks = autograd.grad of the unsharded model
for p in sharded:  # a gradient being accumulated must come back untouched
    p.grad = torch.full_like(p, 7.0)
g_sharded = gradient(response_loss(model, batch), sharded)
g_plain = gradient(response_loss(reference, batch), plain)
assert all(float(local(p.grad).min()) == float(local(p.grad).max()) == 7.0 for p in sharded), "`.grad` changed"
for p in sharded:
    p.grad = None
for a, b in zip(g_sharded, g_plain):
    close(whole(a), b, "gradient")
close(global_norm(g_sharded), global_norm(g_plain), "global_norm")
close(global_norm(sharded), global_norm(plain), "global_norm of the weights")
close(global_dot(g_sharded, sharded), global_dot(g_plain, plain), "global_dot")

# perturbed: W + dW reaches the forward; on exit every shard holds its own bits again
before = [local(p).clone() for p in sharded]
loss_before = response_loss(model, batch).detach()
step = Scaled(g_sharded, 0.5 / float(global_norm(g_sharded)))
with torch.no_grad(), perturbed(sharded, step):
    loss_moved = response_loss(model, batch)
with torch.no_grad(), perturbed(plain, Scaled(g_plain, 0.5 / float(global_norm(g_plain)))):
    loss_moved_plain = response_loss(reference, batch)
assert abs(float(loss_moved - loss_before)) > 1e-3, "the perturbation did not reach the forward"
close(loss_moved, loss_moved_plain, "perturbed loss")
assert all(torch.equal(local(p), b) for p, b in zip(sharded, before)), "weights not restored bit-exactly"
assert torch.equal(response_loss(model, batch).detach(), loss_before), "loss after restoring differs"

# like / whole: a saved (whole) list comes back as this rank's shards
restored = like([whole(g) for g in g_sharded], sharded)
assert all(torch.equal(local(a), local(b)) for a, b in zip(restored, g_sharded)), "like() shards differ"

# all_finite: a NaN in one rank's shard only is seen by every rank
poisoned = [g.clone() for g in g_sharded]
if rank == 1:
    local(poisoned[0]).view(-1)[0] = float("nan")
assert all_finite(g_sharded) and not all_finite(poisoned), "all_finite disagrees between ranks"
dist.barrier()
if rank == 0:
    print("OK", flush=True)
dist.destroy_process_group()

"""Cohort training (engine.train_cohort): K clients stepping together give what each gives training alone.

Every opted-in method trains three clients of unequal sizes (one of them a straggler with a smaller step budget) as
one cohort and one after another (`train_local`, the sequential path) from the same per-client states, seeds and
batch orders; final states and losses must agree to reassociation. The test runs in float64: a batched text-tower
call may sum in another order than K separate ones (bitwise equal on one CPU measured, not on an AVX-512 one), and in
fp32 AdamW turns such a rounding-level gradient difference on a near-zero element into a step of ~lr (9.5e-6 on one
of CoOp's 2,048 class-specific context values there); in float64 the states agree to 1e-9. AdamW with
weight decay makes any step a finished client should not take visible: its parameters, moments and step count would
all move. The reference is each method's own `backward`, so the stacked code is checked against the method's math.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flbench.algorithms.base import build_method
from flbench.algorithms.cohort import ClientState, bound
from flbench.engine import CohortMember, stacking_refusal, step_activation_bytes, train_cohort, train_local
from helpers import random_tiny

pytestmark = pytest.mark.usefixtures("one_thread", "float64")

CLASSES = ["red circle", "blue square", "green star", "pink moon"]
TEMPLATE = ["a photo of a {}."]
SIZES = (5, 9, 3)  # 2, 3 and 1 batches of 4 per epoch
BUDGETS = (None, 2, None)  # client 1 is a straggler: 2 of its 6 steps
TRAIN = {"optimizer": "adamw", "lr": 0.01, "weight_decay": 0.01, "batch_size": 4, "epochs": 2}
TOLERANCE = {"rtol": 1e-9, "atol": 1e-10}  # float64 reassociation, amplified by a few AdamW steps
METHODS = [("coop", {}), ("coop", {"class_specific": True}), ("kgcoop", {}), ("prograd", {}), ("cocoop", {}),
           ("promptfolio", {}), ("fedpgp", {}), ("fedotp", {"max_iter": 20}), ("dpfpl", {}),
           ("dpfpl", {"clipping": "example"}), ("dpfpl", {"epsilon": None})]


class Shard:
    """A client's training set as the engine sees it when features are cached: labels and a length."""

    def __init__(self, labels: np.ndarray) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)


@pytest.fixture(scope="module")
def backbone():
    return random_tiny().double()


def _method(backbone, name, hparams):
    torch.manual_seed(0)
    return build_method(name, backbone, CLASSES, TEMPLATE, hparams)


def _clients(method, backbone):
    """Per client: its initial state (the shared start plus its own perturbation), cached features, labels."""
    g = torch.Generator().manual_seed(3)
    local = 3 if method.name == "fedotp" else None  # FedOTP reads M local features per image
    clients = []
    for k, n in enumerate(SIZES):
        state = {name: t.detach().clone() for name, t in method.state_dict().items()}
        for name, p in method.named_parameters():
            if p.requires_grad:
                state[name] = state[name] + 0.02 * torch.randn(p.shape, generator=g)
        shape = (n, local, backbone.embed_dim) if local else (n, backbone.embed_dim)
        clients.append((state, torch.randn(shape, generator=g),
                        torch.randint(0, len(CLASSES), (n,), generator=g).numpy()))
    return clients


def _sequential(method, clients):
    out = []
    for k, (state, features, labels) in enumerate(clients):
        method.load_state_dict(state)
        torch.manual_seed(100 + k)  # the client's own stream (DP-FPL's factorisation and noise)
        result = train_local(method, Shard(labels), TRAIN, torch.Generator().manual_seed(k), cached=features,
                             max_steps=BUDGETS[k])
        out.append(({n: t.detach().clone() for n, t in method.state_dict().items()}, result))
    return out


def _cohort(method, clients):
    members = []
    for k, (state, features, labels) in enumerate(clients):
        method.load_state_dict(state)
        torch.manual_seed(100 + k)
        members.append(CohortMember(ClientState.of(method, copy=True, owner=k), Shard(labels),
                                    torch.Generator().manual_seed(k), features, max_steps=BUDGETS[k]))
    untouched = {n: t.detach().clone() for n, t in method.state_dict().items()}
    results = train_cohort(method, members, TRAIN)
    for name, tensor in method.state_dict().items():
        assert torch.equal(tensor, untouched[name]), f"the process's own {name} was written by the cohort"
    return [({n: t.detach() for n, t in m.state.tensors.items()}, r) for m, r in zip(members, results)]


@pytest.mark.parametrize("name, hparams", METHODS, ids=[f"{n}{'-' + '-'.join(h) if h else ''}" for n, h in METHODS])
def test_a_cohort_trains_every_client_as_it_trains_alone(backbone, name, hparams):
    method = _method(backbone, name, hparams)
    assert method.stacks and stacking_refusal(method) is None
    clients = _clients(method, backbone)
    trainable = [n for n, p in method.named_parameters() if p.requires_grad]
    alone, together = _sequential(method, clients), _cohort(method, clients)
    for k, ((state_a, result_a), (state_c, result_c)) in enumerate(zip(alone, together)):
        assert (result_c.steps, result_c.num_examples) == (result_a.steps, result_a.num_examples), k
        assert result_c.loss == pytest.approx(result_a.loss, rel=1e-9, abs=1e-10), k
        for key in state_a:
            assert torch.allclose(state_c[key], state_a[key], **TOLERANCE), (k, key)
        assert all(not torch.equal(state_c[key], clients[k][0][key]) for key in trainable), f"client {k} trained"
    assert [r.steps for _, r in alone] == [4, 2, 2], "unequal shards and a straggler: the cohort's tail is masked"


def test_personal_methods_mark_each_client_personalised(backbone):
    method = _method(backbone, "fedpgp", {})
    clients = _clients(method, backbone)
    for state, _ in _cohort(method, clients):
        assert state["personalised"].item() == 1.0
    assert method.personalised.item() == clients[-1][0]["personalised"].item() == 0.0


def test_bound_swaps_parameters_buffers_and_the_random_stream_and_names_the_owner(backbone):
    method = _method(backbone, "promptfolio", {})
    own = method.global_ctx
    torch.manual_seed(7)
    state = ClientState.of(method, copy=True, owner=5)
    expected = torch.rand(3)  # what the client's stream gives first
    torch.manual_seed(1)
    outer = torch.get_rng_state()
    with bound(method, state):
        assert method.global_ctx is state.tensors["global_ctx"] and method.personalised is state.tensors["personalised"]
        assert dict(method.named_parameters())["local_ctx"] is state.tensors["local_ctx"]
        assert torch.equal(torch.rand(3), expected)
    assert method.global_ctx is own and torch.equal(torch.get_rng_state(), outer), "the caller's stream is back"
    with bound(method, state):
        continued = torch.rand(3)
    torch.manual_seed(7)
    torch.rand(3)
    assert torch.equal(continued, torch.rand(3)), "the client's stream continues where it stopped"
    with pytest.raises(ValueError) as raised, bound(method, state):
        raise ValueError("boom")
    assert raised.value.flbench_client == 5


def test_methods_that_do_not_stack_train_one_at_a_time(backbone):
    method = _method(backbone, "plot", {"n_prompts": 2})
    assert "does not say how its state stacks" in stacking_refusal(method)
    members = [CohortMember(ClientState.of(method, copy=True), Shard(np.zeros(2, np.int64)), torch.Generator())
               for _ in range(2)]
    with pytest.raises(ValueError, match="2 clients but algorithm plot"):
        train_cohort(method, members, TRAIN)
    coop = _method(backbone, "coop", {})
    coop.precision = "fp16"
    assert "fp16" in stacking_refusal(coop)


def test_activation_probe_counts_what_each_client_adds_and_draws_nothing(backbone):
    method = _method(backbone, "coop", {})
    (state, features, labels), = _clients(method, backbone)[:1]
    member = CohortMember(ClientState.of(method, copy=True), Shard(labels), torch.Generator().manual_seed(0), features)
    before_generator, before_global = member.generator.get_state(), torch.get_rng_state()
    one = step_activation_bytes(method, member, TRAIN)
    assert torch.equal(member.generator.get_state(), before_generator)
    assert torch.equal(torch.get_rng_state(), before_global)
    assert all(p.grad is None for p in method.parameters())
    # the text tower's activations of C prompts dominate: at least one [C, L, width] tensor per layer, and far less
    # than the backbone itself (which is not counted)
    layers = len(backbone.model.transformer.resblocks)
    assert one >= layers * len(CLASSES) * 2 * backbone.text_width * 4
    assert one < sum(p.numel() * p.element_size() for p in backbone.parameters())
    cocoop = _method(backbone, "cocoop", {})
    member = CohortMember(ClientState.of(cocoop, copy=True), Shard(labels), torch.Generator(), features)
    assert step_activation_bytes(cocoop, member, TRAIN) > 2 * one, "CoCoOp encodes B·C prompts, not C"

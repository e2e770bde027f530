"""PLOT, FedOTP, VPT, MaPLe and PromptSRC in a real (small) federation on the synthetic suite with the tiny ViT CLIP:
each run lowers the training loss; FedOTP's local prompt survives between rounds in the client's Context; PromptSRC
reports the Gaussian prompt average while clients keep training from the live aggregate."""

import math

import pytest
import torch

import flbench.fl.client_app as client_app
import flbench.run as run_module
from flbench.algorithms.promptsrc import PromptSRC
from flbench.fl.client_app import LOCAL_KEY, to_state
from flbench.run import run
from helpers import compose_config

# 32 classes, one domain, one shot per class, two clients of 16 images: one local step per client and round.
FAST = ["backbone=tiny-vit", "dataset.family=patterns", "dataset.domains=[photo]", "dataset.train_per_class=1",
        "dataset.val_per_class=1", "dataset.test_per_class=1", "shots=1", "num_clients=2", "num_rounds=2"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(algorithm, tmp_path, extra=()):
    return run(compose_config([f"algorithm={algorithm}", *FAST, *extra], results_dir=tmp_path))


def _losses(record):
    return [row["train/loss"] for row in record["history"] if "train/loss" in row]


def _record_clients(monkeypatch):
    """Wrap the ClientApp the run builds: per train call, the client's stored local state before and after, the
    method's local state when training starts, and the shared state it received and sent."""
    calls, current = [], {}
    real_train_local = client_app.train_local

    def train_local(method, *args, **kwargs):
        current["start"] = {k: v.clone() for k, v in method.local_state().items()}
        return real_train_local(method, *args, **kwargs)

    def wrap(app):
        def call(message, context):
            stored = to_state(context.state[LOCAL_KEY]) if LOCAL_KEY in context.state else {}
            reply = app(message, context)
            if "start" in current:
                calls.append({
                    "client": int(context.node_config["partition-id"]),
                    "round": int(message.content["config"]["server-round"]),
                    "received": to_state(message.content["arrays"]), "stored_before": stored,
                    "start": current.pop("start"), "sent": to_state(reply.content["arrays"]),
                    "stored_after": to_state(context.state[LOCAL_KEY]) if LOCAL_KEY in context.state else {}})
            return reply
        return call

    real_make = run_module.make_client_app
    monkeypatch.setattr(client_app, "train_local", train_local)
    monkeypatch.setattr(run_module, "make_client_app", lambda *a, **k: wrap(real_make(*a, **k)))
    return calls


@pytest.mark.parametrize("algorithm, extra", [("plot", ["algorithm.n_prompts=2"]), ("vpt", []), ("maple", [])])
def test_a_federated_run_lowers_the_training_loss(algorithm, extra, tmp_path):
    record = _run(algorithm, tmp_path, extra)
    losses = _losses(record)
    assert len(losses) == 2 and losses[-1] < losses[0], losses
    assert record["costs"]["trainable_params"] > 0


def test_fedotp_local_prompt_stays_on_its_client_between_rounds(tmp_path, monkeypatch):
    calls = _record_clients(monkeypatch)
    # OT accuracy is not this test's subject; the spy sees train_local, the one-client path (cohorts: test_cohort*.py)
    record = _run("fedotp", tmp_path, ["algorithm.max_iter=10", "backend.cohort_size=1"])
    losses = _losses(record)
    assert losses[-1] < losses[0], losses
    width = len(calls[0]["sent"]["global_ctx"][0])  # the text width, read from the model: 4 context vectors of it
    costs = record["costs"]
    assert costs["trainable_params"] == 2 * 4 * width and costs["shared_params"] == 4 * width
    assert costs["bytes_per_round"] == 2 * 2 * 4 * width * 4, "up + down, 2 clients, float32, global prompt only"
    by = {(c["client"], c["round"]): c for c in calls}
    assert set(by) == {(0, 1), (1, 1), (0, 2), (1, 2)}
    initial = by[(0, 1)]["start"]["local_ctx"]
    for client in (0, 1):
        first, second = by[(client, 1)], by[(client, 2)]
        assert set(first["sent"]) == set(second["sent"]) == {"global_ctx"}, "only the global prompt travels"
        assert torch.equal(first["start"]["local_ctx"], initial)  # round 1 starts from the initial prompt
        # Round 2 starts from exactly what this client held at the end of round 1 (not an average, not a reset).
        assert torch.equal(second["stored_before"]["local_ctx"], first["stored_after"]["local_ctx"])
        assert torch.equal(second["start"]["local_ctx"], first["stored_after"]["local_ctx"])
        assert not torch.equal(second["start"]["local_ctx"], initial)
        assert not torch.equal(second["stored_after"]["local_ctx"], second["start"]["local_ctx"]), "trained again"
        # Both clients received the same aggregated global prompt.
        assert torch.equal(second["received"]["global_ctx"], by[(0, 2)]["received"]["global_ctx"])
    assert not torch.allclose(by[(0, 2)]["stored_after"]["local_ctx"], by[(1, 2)]["stored_after"]["local_ctx"])


def test_promptsrc_reports_the_gaussian_average_but_trains_on_the_live_aggregate(tmp_path, monkeypatch):
    calls = _record_clients(monkeypatch)
    reports = []
    real = PromptSRC.reported_state

    def spy(self, history):
        reported = real(self, history)
        reports.append(([dict(h) for h in history], reported))
        return reported

    monkeypatch.setattr(PromptSRC, "reported_state", spy)
    record = _run("promptsrc", tmp_path, ["algorithm.gpa_mean=0.0", "algorithm.gpa_std=1.0"])
    losses = _losses(record)
    assert losses[-1] < losses[0], losses
    # Evaluations after rounds 0, 1, 2 saw the aggregates so far (round 0 = initial state).
    after_round = {len(history) - 1: (history, reported) for history, reported in reports}
    assert {0, 1, 2} <= set(after_round)
    history, reported = after_round[2]  # the last round: the Gaussian average of rounds 1..2
    weights = [math.exp(-r ** 2 / 2) for r in (1, 2)]  # μ = 0, σ = 1
    for key, value in reported.items():
        expected = sum(w * h[key].double() for w, h in zip(weights, history[1:])) / sum(weights)
        assert torch.allclose(value.double(), expected, atol=1e-6), key
        assert not torch.allclose(value, history[-1][key]), "the reported model is not the live one"
    # Before the last round the live aggregate is reported, and round 2's clients trained from it.
    live, reported_1 = after_round[1][0][-1], after_round[1][1]
    assert all(torch.equal(reported_1[k], live[k]) for k in live)
    for call in (c for c in calls if c["round"] == 2):
        assert all(torch.equal(call["received"][k], live[k]) for k in live)

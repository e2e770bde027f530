"""Text-side methods in a federation: every method runs two rounds on a very small synthetic config and lowers its
training loss; personal parts stay on their client, differ between clients, and come back intact the next round;
DP-FPL's record carries the privacy budget; the zero-shot template ensemble uses the dataset's templates."""

import pytest
import torch
from flwr.app import ArrayRecord

from flbench.algorithms.base import PromptMethod
from flbench.algorithms.prompting import handcrafted_text_features
from flbench.experiment import get_experiment
from flbench.fl.backends import run_inprocess
from flbench.fl.client_app import LOCAL_KEY, make_client_app, to_state
from flbench.fl.server_app import RoundLog, make_server_app
from flbench.run import run
from helpers import compose_config

# 32 classes, one domain, one shot per class, two clients of 16 images: one local step per client and round.
FAST = ["dataset.family=patterns", "dataset.domains=[photo]", "dataset.train_per_class=1", "dataset.val_per_class=1",
        "dataset.test_per_class=1", "shots=1", "num_clients=2", "num_rounds=2", "logger.mode=disabled"]
CHEAP = {"proda": ["algorithm.n_prompts=4"]}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", ["cocoop", "kgcoop", "prograd", "proda", "fedtpg", "promptfolio", "fedpgp"])
def test_two_rounds_run_and_lower_the_training_loss(tmp_path, name):
    record = run(compose_config(FAST + [f"algorithm={name}"] + CHEAP.get(name, []), results_dir=tmp_path))
    losses = [row["train/loss"] for row in record["history"] if "train/loss" in row]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert record["costs"]["trainable_params"] > 0 and record["method"] == {}


def test_dpfpl_run_reports_its_privacy_budget(tmp_path):
    # A loose budget so that two noisy steps can still lower the loss; the noise is still added and accounted.
    record = run(compose_config(FAST + ["algorithm=dpfpl", "algorithm.epsilon=200"], results_dir=tmp_path))
    losses = [row["train/loss"] for row in record["history"] if "train/loss" in row]
    assert losses[1] < losses[0]
    dp = record["method"]["dp"]
    assert dp["enabled"] and dp["target_epsilon"] == 200 and dp["delta"] == 1e-5
    assert dp["noise_multiplier"] == pytest.approx((2 * 11.512925) ** 0.5 / 200, rel=1e-5)  # rounds=${num_rounds}
    assert 0 < dp["epsilon_released"] < dp["epsilon"] and len(dp["epsilon_per_client"]) == 2
    assert record["costs"]["bytes_up_per_client"] == 4 * 4 * 128  # the global prompt only


@pytest.mark.parametrize("name", ["promptfolio", "fedpgp", "dpfpl"])
def test_local_parts_stay_with_their_client_and_come_back_next_round(monkeypatch, name):
    cfg = compose_config(FAST + [f"algorithm={name}", "num_rounds=1"]
                         + (["algorithm.epsilon=null"] if name == "dpfpl" else []))
    restored = []
    load_partial = PromptMethod.load_partial

    def recording(self, state):
        if "personalised" in state:  # a client restoring its own local state from Context.state
            restored.append({k: v.clone() for k, v in state.items()})
        load_partial(self, state)

    monkeypatch.setattr(PromptMethod, "load_partial", recording)
    client_app = make_client_app(cfg)
    grid = run_inprocess(make_server_app(cfg, RoundLog()), client_app, 2)
    assert restored == [], "nothing to restore in the first round"
    after_first = [to_state(ctx.state[LOCAL_KEY]) for ctx in grid.contexts.values()]
    method = get_experiment(cfg).method
    keys = [k for k in method.local_parameter_keys()]
    assert keys and not any(k in method.shared_keys() for k in keys)
    for key in keys:
        assert not torch.allclose(after_first[0][key], after_first[1][key]), f"{key} must differ between clients"
        initial = get_experiment(cfg).initial_state[key]
        assert not torch.allclose(after_first[0][key], initial), f"{key} must have been trained"

    run_inprocess(make_server_app(cfg, RoundLog()), client_app, 2, grid=grid)  # the next round, same clients
    assert len(restored) == 2
    for state in restored:  # each client got back exactly what it held at the end of its previous round
        matches = [i for i, held in enumerate(after_first)
                   if all(torch.equal(state[k], held[k]) for k in held)]
        assert len(matches) == 1
    assert sorted(i for state in restored for i, held in enumerate(after_first)
                  if all(torch.equal(state[k], held[k]) for k in held)) == [0, 1]
    after_second = [to_state(ctx.state[LOCAL_KEY]) for ctx in grid.contexts.values()]
    for key in keys:
        assert not torch.allclose(after_second[0][key], after_second[1][key])
        assert not torch.allclose(after_second[0][key], after_first[0][key]), "round 2 trained on from round 1"
    shared = set(method.shared_keys())
    assert all(not (set(state) & shared) for state in after_second), "nothing shared is kept as local state"


def test_zeroshot_ensemble_uses_the_datasets_templates(tmp_path):
    cfg = compose_config(FAST + ["algorithm=zeroshot", "algorithm.ensemble=true",
                                 "dataset.domains=[photo,sketch]"], results_dir=tmp_path)
    experiment = get_experiment(cfg)
    method = experiment.new_method()
    templates = experiment.bundle.templates
    assert templates == ["a photo of a {}.", "a sketch of a {}."] and method.templates == templates
    names = experiment.scenario.train_classnames
    assert torch.allclose(method.handcrafted, handcrafted_text_features(experiment.backbone, names, templates))
    single = handcrafted_text_features(experiment.backbone, names, templates[:1])
    assert not torch.allclose(method.handcrafted, single)
    record = run(cfg)
    assert len(record["history"]) == 1 and record["costs"]["trainable_params"] == 0  # nothing to train


def test_arrays_of_local_state_survive_flowers_records():
    """Context.state holds ArrayRecords: the personalisation flag and prompts must round-trip exactly."""
    state = {"personalised": torch.ones(1), "local_ctx": torch.randn(4, 8)}
    back = to_state(ArrayRecord(state))
    assert all(torch.equal(back[k], state[k]) for k in state)

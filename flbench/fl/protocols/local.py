"""The two reference points every federated number sits between.

- **local** — no aggregation: each client trains its own model, which persists in its Context.state and never
  leaves it (the personalisation floor). The server's model never changes, so only personalised scenarios
  (personal, dual) report anything meaningful; validation refuses the others.
- **centralized** — one node holding the union of every training client's shard, trained with the same local
  recipe (the upper bound that pooling the data would give). The experiment builds that single node's shard.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAvg

from flbench.fl.protocols import Protocol, register


class NoAggregation(FedAvg):
    """FedAvg's sampling and metric averaging, but the model is never replaced (clients send no arrays)."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(list(replies), is_train=True, validate=False)
        if not valid:
            return None, None
        return None, self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)


register("local", Protocol(lambda cfg, common: NoAggregation(**common), aggregates=False, communication=0.0))
register("centralized", Protocol(lambda cfg, common: FedAvg(**common), centralized=True))

"""Human names for tables and plots: config keys, option names and metric names as a paper would print them.

Anything without an entry falls back to a tidied form of itself (underscores → spaces), so a new method, dataset or
metric still prints, just less prettily; add it here to name it as its paper does.
"""

from __future__ import annotations

KEYS = {
    "algorithm.name": "method", "protocol.name": "protocol", "dataset.name": "dataset", "backbone.arch": "backbone",
    "dataset.family": "dataset family", "scenario.name": "scenario", "backbone.name": "backbone",
    "partition.name": "partition", "backbone.attention.kind": "attention", "num_clients": "clients",
    "num_rounds": "rounds", "shots": "shots", "seed": "seed", "partition.alpha": "Dirichlet α",
    "protocol.fraction": "client fraction", "backbone.attention.name": "attention",
}

VALUES = {
    "algorithm.name": {
        "zeroshot": "Zero-shot CLIP", "coop": "CoOp", "cocoop": "CoCoOp", "kgcoop": "KgCoOp", "prograd": "ProGrad",
        "proda": "ProDA", "plot": "PLOT", "maple": "MaPLe", "vpt": "VPT", "promptsrc": "PromptSRC",
        "fedotp": "FedOTP", "fedpgp": "FedPGP", "fedtpg": "FedTPG", "promptfolio": "PromptFolio", "dpfpl": "DP-FPL",
        "kgcoop_flip": "KgCoOp (FLIP)", "fedpgp_flip": "FedPGP (FLIP)", "proda_flip": "ProDA (FLIP)",
        "promptfolio_flip": "PromptFolio (FLIP)", "promptsrc_flip": "PromptSRC (FLIP)",
    },
    "protocol.name": {
        "fedavg": "FedAvg", "fedprox": "FedProx", "scaffold": "SCAFFOLD", "fedadam": "FedAdam", "fedyogi": "FedYogi",
        "fedadagrad": "FedAdagrad", "fedavgm": "FedAvgM", "local": "local only", "centralized": "centralized",
    },
    "scenario.name": {
        "global": "global", "base2novel": "base-to-novel", "personal": "personalised", "dual": "dual",
        "few-shot": "few-shot", "multidomain": "multi-domain", "xdomain": "cross-domain", "xdataset": "cross-dataset",
        "unseen-clients": "unseen clients",
    },
    "backbone.name": {"tiny": "tiny CLIP (ResNet)", "tiny-vit": "tiny CLIP (ViT)", "open_clip": "open_clip CLIP"},
    "backbone.arch": {"ViT-B-16": "ViT-B/16", "ViT-B-32": "ViT-B/32", "ViT-L-14": "ViT-L/14"},
    # conf/backbone/attention/*.yaml: one option file per row of the backbone tables (docs/backbones.md)
    "backbone.attention.name": {
        "dense": "dense", "gqa": "GQA", "gqa_uptrained": "GQA, uptrained", "routed_kv": "routed-KV",
        **{f"routed_{code}": f"routed-KV {':'.join(code)}, calibrated" for code in ("316", "112", "162", "118")},
        **{f"routed_{code}_uptrained": f"routed-KV {':'.join(code)}, calibrated + uptrained"
           for code in ("316", "112", "162", "118")},
    },
    "partition.name": {"dirichlet": "Dirichlet", "iid": "IID", "domain": "one domain per client",
                       "class-disjoint": "class-disjoint", "pathological": "pathological",
                       "quantity-skew": "quantity skew"},
}

METRICS = {
    "global": "Global", "base": "Base", "novel": "Novel", "hm": "HM", "personal": "Personal", "mean": "Mean",
    "source": "Source", "unseen": "Unseen clients", "unseen_finetuned": "Unseen clients (fine-tuned)",
    "personal_mean": "Personal (client mean)", "unseen_mean": "Unseen clients (client mean)",
}
METRIC_GROUPS = {"domain": "", "target": "→ ", "client": "client "}  # "domain/photo" → "photo"


def key_label(key: str) -> str:
    return KEYS.get(key, key.rsplit(".", 1)[-1].replace("_", " "))


def value_label(key: str, value: str) -> str:
    return VALUES.get(key, {}).get(value, value)


def metric_label(metric: str) -> str:
    """'hm' → 'HM', 'domain/photo' → 'photo', 'target/ucf101' → '→ ucf101'; unknown names tidied."""
    if metric in METRICS:
        return METRICS[metric]
    group, _, rest = metric.partition("/")
    if rest and group in METRIC_GROUPS:
        return METRIC_GROUPS[group] + rest.replace("_", " ")
    return metric.replace("_", " ").replace("/", " · ")

"""`python -m flbench.calibrate`: build the converted backbone a config asks for — calibrated routers, uptrained
weights — and cache it, so later runs only load it. A thin command over `flbench.backbones.conversion`.

    python -m flbench.calibrate backbone=tiny-vit +backbone/attention=routed_kv backbone.attention.routers=calibrated
    python -m flbench.calibrate +backbone/attention=gqa backbone.attention.uptrain.steps=60
    ... force=true recomputes the cached steps

The same config groups as a run; a run with the same `backbone` settings loads exactly what this command cached.
"""

from __future__ import annotations

import json
import os
import sys

from flbench.errors import ConfigError, DataFileError


def _print_reports(paths: list) -> None:
    for path in paths:
        report = path.with_suffix(".json")
        print(f"cached: {path}")
        if report.exists():
            data = json.loads(report.read_text())
            print(f"  held-out before: {data['before']}\n  held-out after:  {data['after']}\n"
                  f"  ({data['steps']} steps, {data['seconds']} s; report: {report})")


def main() -> None:
    import hydra
    from omegaconf import DictConfig, OmegaConf

    from flbench.cli import CONF_DIR, setup_logging

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
    def _main(cfg: DictConfig) -> None:
        from flbench.backbones.attention import attention_settings
        from flbench.backbones.build import build_open_clip, build_tiny
        from flbench.backbones.conversion import apply_attention, router_cache_path, uptrain_cache_path

        setup_logging(bool(cfg.get("verbose", False)))
        resolved = OmegaConf.to_container(cfg, resolve=True)
        if resolved.get("cache_dir"):
            os.environ["FLBENCH_CACHE"] = str(resolved["cache_dir"])
        backbone_cfg = dict(resolved["backbone"])
        try:
            attention = attention_settings(backbone_cfg.get("attention"))
            calibrated = attention["kind"] == "routed_kv" and attention["routers"] == "calibrated"
            uptrained = attention["kind"] != "dense" and attention["uptrain"]["steps"] > 0
            if not (calibrated or uptrained):
                raise ConfigError("nothing to prepare: set backbone.attention.routers=calibrated (routed_kv) and/or "
                                  "backbone.attention.uptrain.steps>0 (gqa, routed_kv)")
            if backbone_cfg.get("name", "").startswith("tiny"):
                backbone = build_tiny(backbone_cfg["name"], backbone_cfg.get("pretrain"), backbone_cfg.get("cache"))
            else:
                backbone = build_open_clip(backbone_cfg["arch"], backbone_cfg.get("pretrained"),
                                           backbone_cfg.get("checkpoint"), backbone_cfg.get("quick_gelu"))
            paths = ([router_cache_path(backbone, backbone_cfg)] if calibrated else []) + \
                    ([uptrain_cache_path(backbone, backbone_cfg)] if uptrained else [])
            apply_attention(backbone, backbone_cfg, force=bool(resolved.get("force", False)))
        except (ConfigError, DataFileError) as error:  # bad input / an unreadable cache file: one line each
            print(f"flbench.calibrate: error: {error}", file=sys.stderr)
            sys.exit(2 if isinstance(error, ConfigError) else 1)
        _print_reports(paths)

    _main()


if __name__ == "__main__":
    main()

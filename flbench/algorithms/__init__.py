"""Prompt-learning methods, one file each, registered by name (see base.PromptMethod)."""

from flbench.algorithms.base import PromptMethod, available_methods, build_method, method_class

__all__ = ["PromptMethod", "available_methods", "build_method", "method_class"]

"""Runtime targets, one module each, behind the small interface of targets.base.Target."""

from targets.base import TARGET_REGISTRY, BuildInfo, Engine, Target, capabilities_of, get_target, target_names

__all__ = ["TARGET_REGISTRY", "BuildInfo", "Engine", "Target", "capabilities_of", "get_target", "target_names"]

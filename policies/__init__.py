"""Built-in policy parts (importing this module registers them) and the preset policies."""

from mosaickv.policies import scorers, selectors, strategies

__all__ = ["scorers", "selectors", "strategies"]

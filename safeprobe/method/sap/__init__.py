"""Safety-Aware Probing: `algorithm` holds Algorithm 1's steps, `trainer` takes them once per training step,
`config` holds the knobs; the fast paths that make the steps cheap sit beside them (`shared_prompt`: the packed
safety pass, `shared_forward`: the shared lower forward, `dropout_masks`: identical dropout in paired passes)."""
from .config import SAPConfig
from .trainer import SAPTrainer

__all__ = ["SAPConfig", "SAPTrainer"]

"""Data layer: readers, record kinds, named datasets, splits and tokenisation."""
from .readers import DatasetOptions
from .records import Example, SafetyPair
from .registry import REGISTRY, available, fingerprint, load_examples, load_pairs, load_prompts, load_records, resolve
from .splits import sample, split

__all__ = ["DatasetOptions", "Example", "SafetyPair", "REGISTRY", "available", "fingerprint", "load_examples", "load_pairs",
           "load_prompts", "load_records", "resolve", "sample", "split"]

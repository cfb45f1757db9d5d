"""Where safeprobe keeps its cache and finds its data (both overridable by environment variables)."""
import os
from pathlib import Path


def home_dir() -> Path:
    """Cache for converted models, aligned bases and judges: $SAFEPROBE_HOME or ~/.cache/safeprobe."""
    return Path(os.environ.get("SAFEPROBE_HOME", Path.home() / ".cache" / "safeprobe")).expanduser()


def data_dir() -> Path:
    """Root of the named datasets: $SAFEPROBE_DATA, else ./data."""
    return Path(os.environ.get("SAFEPROBE_DATA", "data")).expanduser()

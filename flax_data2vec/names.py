"""The short names of the released checkpoints and the form of a hub repo id: no imports, so command lines check
a model name before loading JAX."""

import re

SHORT_NAMES: dict[str, str] = {name: f"facebook/{name}" for name in (
    "data2vec-audio-base", "data2vec-audio-base-10m", "data2vec-audio-base-100h", "data2vec-audio-base-960h",
    "data2vec-audio-large", "data2vec-audio-large-10m", "data2vec-audio-large-100h", "data2vec-audio-large-960h",
    "data2vec-text-base")}
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name

# Setup: inside a checkout (this file in notebooks/) use it; elsewhere (Colab, Kaggle) clone REPO_URL and install it
import subprocess
import sys

IN_CHECKOUT = os.path.isdir(os.path.join("..", "flax_data2vec"))
if IN_CHECKOUT:
    ROOT = os.path.abspath("..")
else:
    ROOT = os.path.abspath("flax_data2vec")  # the clone also holds data/, the small datasets used here
    if not os.path.isdir(ROOT) and "github.com/OWNER/" in REPO_URL:
        raise SystemExit(f"REPO_URL is still the placeholder {REPO_URL!r}: set it in the first code cell to the "
                         "GitHub repository this notebook came from, e.g. https://github.com/NAME/flax_data2vec")
    if not os.path.isdir(ROOT):
        subprocess.run(["git", "clone", "--depth", "1", REPO_URL, ROOT], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", ROOT + "[hf,pipelines]"], check=True)
sys.path.insert(0, ROOT)  # this checkout's package, even where another copy is installed
OUTPUT_DIR = os.path.abspath(OUTPUT_DIR)
os.makedirs(OUTPUT_DIR, exist_ok=True)
DATA = os.path.join(ROOT, "data")
if QUICK:  # quick runs are mostly compiling: unoptimised, XLA's CPU backend compiles ~30% faster (steps no slower)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax

import flax_data2vec as fd

print("flax_data2vec", fd.__version__, "from", os.path.dirname(fd.__file__), "| jax", jax.__version__)
print(jax.devices())
DEVICE = jax.devices()[0]
ACCELERATOR = {"tpu": "TPU", "gpu": "GPU"}.get(DEVICE.platform, "")
if ACCELERATOR:
    print(f"accelerator found: {jax.device_count()} x {ACCELERATOR} ({DEVICE.device_kind})")
else:
    print("no accelerator found: running on CPU" + (" (quick configuration)" if QUICK else
          "; on Colab choose Runtime > Change runtime type > TPU or GPU"))

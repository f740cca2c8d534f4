# %% [markdown]
# # data2vec pre-training of a small audio model, then CTC fine-tuning: pre-trained vs from scratch
#
# What this shows: self-supervised data2vec pre-training (a student predicts, at masked time steps, the average of
# the top layers of an EMA teacher that sees the unmasked audio), with plots of the loss, the variance of the
# teacher's targets and the EMA decay; what the collapse guard checks; then CTC fine-tuning of the pre-trained
# encoder and of the same model from random weights, with both CER curves, and a plain statement of what they show.
#
# **Hardware**: any Colab runtime; a TPU v5e-1 or a GPU makes the full configuration quick. **Run time**: the full
# configuration (3,000 pre-training + 2 x 1,500 fine-tuning steps of the tiny 2-layer model on the shipped clips)
# is estimated at 10-20 minutes on a v5e-1 or L4 (not measured: no accelerator was available here) and takes
# about an hour on a 2-core CPU.
#
# **Quick configuration** (`CI` or `FLAX_DATA2VEC_QUICK=1`): a smaller model (4-layer 32-channel CNN, 64 wide),
# 20 pre-training steps and 2 x 30 fine-tuning steps of 4 clips: 140-175 CPU-seconds (measured, other
# jobs sharing the CPU). That is far too short for either start to leave CTC's all-blank plateau (CER 1.0; the tiny
# models need ~250 steps here), so the quick run compares the two starts by their eval CTC loss only, and says so.

# %% tags=["parameters"]
# Parameters (papermill: this cell is tagged `parameters`; values injected after it win)
import os

QUICK = bool(os.environ.get("CI")) or os.environ.get("FLAX_DATA2VEC_QUICK") == "1"  # small CPU configuration
REPO_URL = "https://github.com/OWNER/flax_data2vec"  # the repository cloned when not run inside a checkout
OUTPUT_DIR = "outputs/03_pretrain_data2vec"  # figures (PNG) and everything this notebook writes

MODEL = "tiny"  # preset: 2 layers, 128 wide, 64-channel CNN (see flax_data2vec/train/presets.py)
# model-config changes (JSON); quick: a 4-layer 32-channel CNN and a 64-wide encoder, cheaper per step than tiny
MODEL_CONFIG = ('{"conv_dim": [32, 32, 32, 32], "conv_stride": [5, 4, 4, 4], "conv_kernel": [10, 8, 8, 8], '
                '"hidden_size": 64, "intermediate_size": 128}') if QUICK else ""
TRAIN_DATA = ""  # "" = the shipped clips (data/speech_digits); any manifest or hf: dataset works
PRETRAIN_STEPS = 20 if QUICK else 3000
FINETUNE_STEPS = 30 if QUICK else 1500
BATCH_SIZE = 4 if QUICK else 8
EVAL_EVERY = 10 if QUICK else 150
LOG_EVERY = 2 if QUICK else 25
# fine-tuning: 0 = the task's defaults (a checkpoint: lr 1e-4 and its CNN frozen; a preset: 1e-3, CNN trained);
# quick: one recipe for both starts, so that only the starting weights differ within the few steps there are
FINETUNE_LR = 3e-3 if QUICK else 0.0
FREEZE_PRETRAINED_CNN = not QUICK
EVAL_CLIPS = 16 if QUICK else 0  # evaluate on the first N shipped eval clips (0: all 100)
N_BUCKETS = 1 if QUICK else 3  # distinct padded lengths = compiled step shapes (quick: compiles dominate)

# %% include setup

# %%
import json

eval_rows = [json.loads(line) for line in open(os.path.join(DATA, "speech_digits", "eval.jsonl"))]
for row in eval_rows:
    row["path"] = os.path.join(DATA, "speech_digits", row["path"])
eval_data = ""
if EVAL_CLIPS:
    eval_data = os.path.join(OUTPUT_DIR, "eval_subset.jsonl")
    with open(eval_data, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in eval_rows[:EVAL_CLIPS])

# %% include live_plot

# %% [markdown]
# ## Pre-train with the EMA teacher
#
# `task="pretrain-audio"`: the student's CNN features are masked in spans (mask_prob 0.65, length 10); the teacher,
# an exponential moving average of the student's Transformer, reads the unmasked features, and its top-K blocks'
# FFN outputs, instance-normalised and averaged, are the regression targets at the masked steps (K = 8 in the
# base recipe, capped here at the model's 2 layers). The EMA decay rises linearly from 0.999 to 0.9999;
# `ema_anneal_steps=PRETRAIN_STEPS` fits that ramp into this short run (the recipe uses 30,000 updates).

# %%
from flax_data2vec.train.config import TrainConfig
from flax_data2vec.train.loop import train

PRETRAIN_DIR = os.path.join(OUTPUT_DIR, "pretrain")
pre_cfg = TrainConfig(task="pretrain-audio", model=MODEL, model_config=MODEL_CONFIG, train_data=TRAIN_DATA,
                      eval_data=eval_data,
                      max_steps=PRETRAIN_STEPS, batch_size=BATCH_SIZE, ema_anneal_steps=PRETRAIN_STEPS,
                      n_buckets=N_BUCKETS, log_every=LOG_EVERY, eval_every=PRETRAIN_STEPS,
                      save_every=PRETRAIN_STEPS, output_dir=PRETRAIN_DIR, progress=not QUICK)
pre_live = LivePlot([("data2vec loss", ["loss"]), ("variance across time", ["target_var", "pred_var"]),
                     ("EMA decay", ["ema_decay"])], every=4, title="data2vec pre-training")
pre_summary = train(pre_cfg, on_log=pre_live)
pre_live.save(os.path.join(OUTPUT_DIR, "pretraining_curves.png"))
print({k: round(v, 4) for k, v in pre_summary.items()
       if k in ("loss", "target_var", "pred_var", "ema_decay", "eval_loss")})

# %% [markdown]
# ## The collapse guard
#
# A student and a teacher that both output a constant would make the regression loss zero: the representation
# *collapses*. data2vec watches the variance, across time steps, of the teacher's targets (`target_var`) and of
# the student's predictions (`pred_var`). fairseq stops a run once, after 5,000 updates, the target variance
# falls under 0.1 or the prediction variance under 0.01, and so does the trainer here: `check_health` raises with
# a message naming the value. The usual cures are a lower learning rate or a slower EMA ramp. The cell below asks
# the guard directly, for the configuration used above, about this run's last values and about a collapsed run:

# %%
from flax_data2vec import pretrain as d2v
from flax_data2vec.train.tasks.pretrain import pretrain_config

depth = fd.load(PRETRAIN_DIR)[0].config.num_hidden_layers
guard = pretrain_config(pre_cfg, d2v.Data2VecPretrainConfig.audio(), depth)  # the released recipe, as the run used it
print(f"guard: after {guard.collapse_check_after} updates, target_var >= {guard.min_target_var}, "
      f"pred_var >= {guard.min_pred_var}")
last = pre_summary["target_var"], pre_summary["pred_var"]
print("this run, as if at update 6000:", d2v.check_collapse(*last, 6000, guard))
print("a collapsed run at update 6000:", d2v.check_collapse(0.02, 0.5, 6000, guard))

# %% [markdown]
# ## Fine-tune for CTC: from the pre-trained encoder and from scratch
#
# Same task, data, steps, batch and seed; the only difference is the starting point. `model=PRETRAIN_DIR` loads the
# pre-trained `Data2VecAudioModel` into a new `Data2VecAudioForCTC` (the log names the new head). With
# `FINETUNE_LR = 0` each start gets the task's defaults: as in wav2vec 2.0 fine-tuning, a checkpoint's CNN feature
# encoder stays frozen and its learning rate is 1e-4, while the random model trains its CNN too, at 1e-3. The quick
# configuration gives both the same learning rate with the CNN trained, so that its few steps compare starts, not
# recipes. Besides the CER, the plot shows the eval CTC loss, which falls while the CER still reads 1.0.

# %%
curves = {}
for name, start in (("pre-trained", PRETRAIN_DIR), ("from scratch", MODEL)):
    ft_cfg = TrainConfig(task="ctc", model=start, model_config=MODEL_CONFIG if start == MODEL else "",
                         train_data=TRAIN_DATA, eval_data=eval_data, learning_rate=FINETUNE_LR,
                         freeze_feature_encoder=FREEZE_PRETRAINED_CNN,
                         max_steps=FINETUNE_STEPS, batch_size=BATCH_SIZE, n_buckets=N_BUCKETS,
                         log_every=LOG_EVERY * 5, eval_every=EVAL_EVERY, save_every=FINETUNE_STEPS,
                         output_dir=os.path.join(OUTPUT_DIR, "ctc-" + name.replace(" ", "-")), progress=not QUICK)
    rows = []
    train(ft_cfg, on_log=rows.append)
    curves[name] = [(r["step"], r["eval_cer"], r["eval_loss"]) for r in rows if "eval_cer" in r]
    print(name, "eval (step, CER, loss):", [(s, round(c, 3), round(loss, 2)) for s, c, loss in curves[name]])

# %%
fig, (ax, ax_loss) = plt.subplots(1, 2, figsize=(11, 3.8))
for name, points in curves.items():
    steps_, cers, losses = zip(*points)
    ax.plot(steps_, cers, marker="o", label=name)
    ax_loss.plot(steps_, losses, marker="o", label=name)
ax.set_xlabel("fine-tuning step")
ax.set_ylabel("eval CER (greedy)")
ax.set_ylim(0, max(1.05, max(p[1] for points in curves.values() for p in points) + 0.05))
ax.axhline(1.0, color="0.6", lw=0.8, ls="--")
ax.legend()
ax_loss.set_xlabel("fine-tuning step")
ax_loss.set_ylabel("eval CTC loss per utterance")
ax_loss.legend()
fig.suptitle(f"CTC fine-tuning after {PRETRAIN_STEPS} pre-training steps")
fig.savefig(os.path.join(OUTPUT_DIR, "finetune_cer.png"), dpi=100, bbox_inches="tight")
plt.show()

# %% [markdown]
# ## What the curves show
#
# The next cell states it from the numbers of this run, whichever way they fall. A CER of 1.0 means the model
# outputs only blanks (the CTC plateau every model sits on at first); a CER just under 1.0 with a few random letters
# out is no better. A clearly lower CER after the same number of steps means that start learned faster. While both
# are on the plateau, the eval CTC loss is the only signal, and a weak one: a lower loss there says that start is
# nearer to leaving the plateau, not that it will transcribe better.

# %%
steps, pre, pre_loss = curves["pre-trained"][-1]
_, scratch, scratch_loss = curves["from scratch"][-1]
print(f"after {steps} fine-tuning steps: pre-trained CER {pre:.3f} (eval loss {pre_loss:.2f}), "
      f"from scratch CER {scratch:.3f} (eval loss {scratch_loss:.2f})")
if min(pre, scratch) > 0.95:
    ahead = "pre-trained" if pre_loss < scratch_loss else "from-scratch"
    print(f"Both are still on the all-blank plateau: by CER this run is too short to tell the two starts apart. "
          f"The {ahead} start has the lower eval loss ({min(pre_loss, scratch_loss):.2f} vs "
          f"{max(pre_loss, scratch_loss):.2f}, {abs(pre_loss - scratch_loss) / max(pre_loss, scratch_loss):.0%} apart; "
          "one seed). This run shows that the pipeline works (pre-train, load into a CTC head, fine-tune), "
          "not that pre-training helps.")
elif abs(pre - scratch) < 0.05:
    print("The two starts end within 0.05 CER of each other: no clear effect of pre-training at this size and length.")
elif pre < scratch:
    print(f"The pre-trained start is ahead by {scratch - pre:.3f} CER after {steps} steps: on this data, "
          "pre-training on the same clips sped up fine-tuning (one seed; rerun with other seeds before relying on it).")
else:
    print(f"The model from scratch is ahead by {pre - scratch:.3f} CER after {steps} steps: this short pre-training "
          "did not help here (a tiny model, minutes of audio and the pre-trained start's frozen CNN count against it).")

# %% [markdown]
# ## data2vec v1 vs 2.0 at equal pre-training compute (from the benchmark)
#
# `python -m benchmarks.pretrain_quality` pre-trains the same tiny model with v1 (`pretrain-audio`) and with 2.0
# (`pretrain2-audio`) for the same budget of process-CPU seconds, then runs identical CTC fine-tunes from each and
# from scratch for both architectures. It takes tens of minutes, so this notebook does not rerun it: the next cell
# draws the curves from its saved results (`benchmarks/results/pretrain_quality.json`, the README's figure) and says
# what they show. One seed, 100 eval clips of synthetic speech: differences of a few CER points are noise.

# %%
quality = json.load(open(os.path.join(ROOT, "benchmarks", "results", "pretrain_quality.json")))
budget = quality["pretrain"]["budget_cpu_s"]
fig, (ax, ax_loss) = plt.subplots(1, 2, figsize=(11, 3.8))
for start, rows in quality["ctc"].items():
    ax.plot([r["step"] for r in rows], [r["eval_cer"] for r in rows], marker=".", label=start)
    ax_loss.plot([r["step"] for r in rows], [r["eval_loss"] for r in rows], marker=".", label=start)
ax.set_xlabel("fine-tuning step")
ax.set_ylabel("eval CER (greedy)")
ax.axhline(1.0, color="0.6", lw=0.8, ls="--")
ax.legend()
ax_loss.set_xlabel("fine-tuning step")
ax_loss.set_ylabel("eval CTC loss per utterance")
fig.suptitle(f"CTC fine-tuning after v1 / 2.0 pre-training of ~{budget:.0f} CPU s each (benchmark results)")
plt.show()
final = {start: rows[-1] for start, rows in quality["ctc"].items()}
for start, row in sorted(final.items(), key=lambda kv: kv[1]["eval_cer"]):
    best = min(r["eval_cer"] for r in quality["ctc"][start])
    print(f"{start:>18}: eval CER {row['eval_cer']:.3f} at step {row['step']} (best {best:.3f}), "
          f"eval loss {row['eval_loss']:.2f}")
cers = sorted(row["eval_cer"] for row in final.values())
if cers[0] > 0.95:
    print("No start has left the all-blank CTC plateau: these fine-tunes are too short to rank the starts.")
elif cers[-1] - cers[0] < 0.05:
    print("All starts end within 0.05 CER of each other: no clear effect at this size and budget.")
else:
    lead = min(final, key=lambda s: final[s]["eval_cer"])
    print(f"{lead} ends ahead, by {cers[1] - cers[0]:.3f} CER over the next start (one seed).")

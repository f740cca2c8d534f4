# %% [markdown]
# # flax_data2vec quickstart
#
# What this shows, in a few minutes: load a Data2Vec checkpoint by its short name; transcribe a file with word
# timestamps and play it; classify audio; embed utterances and sentences and compare them (a cosine-similarity
# heatmap); fill masks; export a model to PyTorch and check transformers' output against ours. Everything goes
# through `fd.pipeline(task, model)`, whose task names, arguments and outputs are transformers' own.
#
# **Hardware**: any Colab runtime (CPU, T4 / L4 GPU, TPU v5e-1 / v6e-1). **Run time**: about 3-5 minutes on
# Colab, most of it downloading the checkpoints (base models, ~370 MB each) and compiling. Quick configuration:
# 32-40 CPU-seconds (measured with other jobs sharing the CPU), about a minute on an idle 2-core CPU.
#
# **Quick configuration** (`CI` or `FLAX_DATA2VEC_QUICK=1`): no network. The checkpoints are tiny models with
# *random* weights made in this notebook and saved in transformers' format, so the API is exercised end to end
# but transcripts, labels and similarities are meaningless there. Run it on Colab for real outputs.

# %% tags=["parameters"]
# Parameters (papermill: this cell is tagged `parameters`; values injected after it win)
import os

QUICK = bool(os.environ.get("CI")) or os.environ.get("FLAX_DATA2VEC_QUICK") == "1"  # small CPU configuration
REPO_URL = "https://github.com/OWNER/flax_data2vec"  # the repository cloned when not run inside a checkout
OUTPUT_DIR = "outputs/01_quickstart"  # figures (PNG) and everything this notebook writes

ASR_MODEL = "data2vec-audio-base-960h"  # short name -> facebook/data2vec-audio-base-960h (CTC, LibriSpeech 960 h)
AUDIO_MODEL = "data2vec-audio-base"  # pre-trained, no head: embeddings, and a classifier with a new head below
TEXT_MODEL = "data2vec-text-base"  # pre-trained, no trained LM head (see "Fill masks")
BATCH_SIZE = 8

# %% include setup

# %% [markdown]
# ## Models
#
# `fd.load(name)` takes a short name (`data2vec-audio-base-960h` is `facebook/data2vec-audio-base-960h`), a hub
# repo id, a local transformers or flax_data2vec directory, or a `train_tpu.py` output directory, and returns a
# `(module, params)` pair: a plain `flax.linen` module and its parameter tree. The first load of a PyTorch
# checkpoint converts it once and caches an Orbax copy (`$FLAX_DATA2VEC_CACHE`).
#
# In the quick configuration the next cell writes three tiny random checkpoints of the same kinds (a CTC model, an
# audio encoder, a text encoder) with transformers' `save_pretrained`, plus their processor files, and points the
# names above at them.

# %%
import numpy as np

from flax_data2vec import processors

if QUICK:  # tiny random checkpoints built with transformers (fast to create) and saved with their processors
    os.environ["FLAX_DATA2VEC_CACHE"] = os.path.join(OUTPUT_DIR, "cache")  # keep ~/.cache clean
    import torch
    import transformers
    from tokenizers import ByteLevelBPETokenizer

    torch.manual_seed(0)
    LETTERS = ["<pad>", "<s>", "</s>", "<unk>", "|", *"abcdefghijklmnopqrstuvwxyz'"]
    SMALL_AUDIO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       conv_dim=(32, 32, 32), conv_stride=(5, 4, 4), conv_kernel=(10, 4, 4),
                       num_conv_pos_embedding_groups=4, conv_pos_kernel_size=5, num_conv_pos_embeddings=3)

    ctc = transformers.Data2VecAudioForCTC(transformers.Data2VecAudioConfig(
        **SMALL_AUDIO, vocab_size=len(LETTERS), pad_token_id=0))
    with torch.no_grad():
        ctc.lm_head.bias[1:4] = -10.0  # keep <s> </s> <unk> out of the random model's transcripts
    ASR_MODEL = os.path.join(OUTPUT_DIR, "tiny-ctc")
    ctc.save_pretrained(ASR_MODEL)
    processors.save_ctc_processor(ASR_MODEL, LETTERS)

    AUDIO_MODEL = os.path.join(OUTPUT_DIR, "tiny-audio")  # like data2vec-audio-base: the encoder only
    transformers.Data2VecAudioModel(transformers.Data2VecAudioConfig(**SMALL_AUDIO)).save_pretrained(AUDIO_MODEL)
    processors.save_feature_extractor(AUDIO_MODEL)

    # a byte-level BPE (RoBERTa's special tokens) trained on the shipped Austen corpus
    bpe = ByteLevelBPETokenizer()
    bpe.train([os.path.join(DATA, "text", "corpus.txt")], vocab_size=2000, show_progress=False,
              special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe_dir = os.path.join(OUTPUT_DIR, "bpe")
    os.makedirs(bpe_dir, exist_ok=True)
    bpe.save_model(bpe_dir)
    tokenizer = transformers.RobertaTokenizerFast(os.path.join(bpe_dir, "vocab.json"),
                                                  os.path.join(bpe_dir, "merges.txt"), model_max_length=128)
    TEXT_MODEL = os.path.join(OUTPUT_DIR, "tiny-text")  # like data2vec-text-base: the encoder only
    transformers.Data2VecTextModel(transformers.Data2VecTextConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=len(tokenizer),
        max_position_embeddings=130, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)).save_pretrained(TEXT_MODEL)
    tokenizer.save_pretrained(TEXT_MODEL)

module, params = fd.load(ASR_MODEL)
n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
print(f"{ASR_MODEL}: {type(module).__name__}, {n_params / 1e6:.2f} M parameters, "
      f"hidden size {module.config.hidden_size}, {module.config.num_hidden_layers} layers")

# %% [markdown]
# ## Transcribe a file, with word timestamps
#
# `fd.pipeline("automatic-speech-recognition", model)` decodes and resamples the file on host threads, pads
# batches to a few bucketed lengths (one compiled program per length) and decodes CTC greedily (or with
# pyctcdecode + kenlm given `lm=`). `chunk_length_s=30` handles long audio as transformers does.

# %%
import json

from IPython.display import Audio

eval_rows = [json.loads(line) for line in open(os.path.join(DATA, "speech_digits", "eval.jsonl"))]
for row in eval_rows:
    row["path"] = os.path.join(DATA, "speech_digits", row["path"])
CLIP = eval_rows[0]["path"]
print("reference:", eval_rows[0]["text"])

asr = fd.pipeline("automatic-speech-recognition", ASR_MODEL, batch_size=BATCH_SIZE)
result = asr(CLIP, return_timestamps="word")
print("transcript:", repr(result["text"]))
for word in result["chunks"][:12]:
    print(f"  {word['timestamp'][0]:5.2f}-{word['timestamp'][1]:5.2f} s  {word['text']}")
Audio(CLIP)

# %%
import matplotlib.pyplot as plt
import soundfile as sf

wave, sr = sf.read(CLIP, dtype="float32")
fig, ax = plt.subplots(figsize=(10, 2.6))
ax.plot(np.arange(len(wave)) / sr, wave, lw=0.5, color="0.3")
for i, word in enumerate(result["chunks"]):
    start, end = word["timestamp"]
    ax.axvspan(start, end, color=f"C{i % 10}", alpha=0.25)
    ax.text((start + end) / 2, 0.9 * np.abs(wave).max(), word["text"][:20], ha="center", fontsize=9)
ax.set_xlabel("seconds")
ax.set_title(f"word timestamps: {result['text'][:60]!r} (reference {eval_rows[0]['text']!r})")
fig.savefig(os.path.join(OUTPUT_DIR, "word_timestamps.png"), dpi=100, bbox_inches="tight")
plt.show()

# %% [markdown]
# ## Classify audio
#
# `audio-classification` returns transformers' `[{"score", "label"}, ...]` per clip. No data2vec audio classifier
# is published on the hub, so this loads the pre-trained encoder into `Data2VecAudioForSequenceClassification` with
# a new, random head (`fd.load(..., architecture=..., rng=0)`; a warning names the new parameters) and passes the
# `(module, params)` pair: its labels are random. For a real one, give `fd.pipeline` your fine-tune, e.g. the output
# folder of `python train_tpu.py --task audio-classification` (keyword spotting on the shipped clips).

# %%
classifier_model = fd.load(AUDIO_MODEL, architecture="Data2VecAudioForSequenceClassification", rng=0)
classifier = fd.pipeline("audio-classification", classifier_model, batch_size=BATCH_SIZE)
for row, top in zip(eval_rows[:3], classifier([r["path"] for r in eval_rows[:3]], top_k=3)):
    print(f"{row['label']:>8}: " + ", ".join(f"{t['label']} {t['score']:.2f}" for t in top))

# %% [markdown]
# ## Embeddings and a similarity heatmap
#
# `fd.embed(inputs, model)` gives one vector per clip or sentence (`pooling="mean"` over the last layer's real
# positions, or `pooling="data2vec"`: the average of the top K layers, instance-normalised, as data2vec's
# targets). Below: two clips each of three different first words, spoken by different voices, and three pairs of
# related sentences. With random weights (quick configuration) the matrix says nothing about meaning.

# %%
by_label = {}
for row in eval_rows:
    by_label.setdefault(row["label"], []).append(row)
picked = [r for label in [k for k, v in by_label.items() if len(v) >= 2][:3] for r in by_label[label][:2]]
sentences = ["It is a truth universally acknowledged.", "Everyone knows this to be true.",
             "She walked to the village in the rain.", "He went into town on foot, in the wet.",
             "The ball at Netherfield was a great success.", "Everyone enjoyed the dance."]
audio_vectors = fd.embed([r["path"] for r in picked], AUDIO_MODEL, pooling="mean")
text_vectors = fd.embed(sentences, TEXT_MODEL, pooling="mean")


def cosine(v):
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    return v @ v.T


fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
for ax, sims, names, title in ((axes[0], cosine(audio_vectors), [r["text"] for r in picked], "utterances"),
                               (axes[1], cosine(text_vectors), [s[:22] for s in sentences], "sentences")):
    image = ax.imshow(sims, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{sims[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
    ax.set_title(f"cosine similarity, {title}")
    fig.colorbar(image, ax=ax, fraction=0.046)
fig.tight_layout()
fig.savefig(os.path.join(OUTPUT_DIR, "similarity.png"), dpi=100, bbox_inches="tight")
plt.show()

# %% [markdown]
# ## Fill masks
#
# data2vec-text was pre-trained by regressing a teacher's features, not by predicting tokens, so the released
# `data2vec-text-base` has no trained language-model head (fairseq#4535): fill-mask shows the API; for real
# predictions fine-tune one (`python train_tpu.py --task mlm --model data2vec-text-base`). The encoder is loaded into
# `Data2VecTextForMaskedLM` (a new head where the checkpoint has none) and given with its tokenizer.

# %%
from transformers import AutoTokenizer

mlm = fd.load(TEXT_MODEL, architecture="Data2VecTextForMaskedLM", rng=0)
tokenizer = AutoTokenizer.from_pretrained(fd.hub.SHORT_NAMES.get(TEXT_MODEL, TEXT_MODEL))  # short name -> hub id
fill = fd.pipeline("fill-mask", mlm, tokenizer=tokenizer, batch_size=BATCH_SIZE)
for guess in fill("It is a truth universally <mask>.", top_k=5):
    print(f"{guess['score']:.3f}  {guess['sequence']}")

# %% [markdown]
# ## Export to PyTorch and compare with transformers
#
# `fd.hub.save_transformers` writes `config.json` + `model.safetensors` that transformers'
# `from_pretrained` reads (from the command line: `python convert/orbax_to_pytorch.py SRC DST`); the
# state dict itself is `fd.to_transformers_state_dict(module, params)`. The two implementations should agree to
# float32 rounding.

# %%
import torch
import transformers

export_dir = fd.hub.save_transformers(os.path.join(OUTPUT_DIR, "pytorch_export"), module, params, overwrite=True)
torch_model = transformers.Data2VecAudioForCTC.from_pretrained(export_dir).eval()
x = (wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)  # the feature extractor's normalisation
ours = np.asarray(jax.jit(module.apply)({"params": params}, x[None]).logits)
with torch.no_grad():
    theirs = torch_model(torch.from_numpy(x[None])).logits.numpy()
diff = float(np.abs(ours - theirs).max())
print(f"logits {ours.shape}: max |flax - transformers| = {diff:.2e}")
assert diff < 1e-3, diff
